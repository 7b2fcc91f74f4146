"""The demo's calls of the command-line tools, as a user would type them: training (reused when finished),
evaluation of models side by side, and any other command (embed, adapt). Every command is printed before it runs,
and runs as that command: its verb's main(argv), what `python -m mrl_clip VERB` calls, here in the demo's process
(a process start costs ~6 s of imports on 2 cores, and the demo runs ~35 commands)."""
import json
import os
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

from mrl_clip import cli
from mrl_clip.checkpoint import latest_checkpoint
from mrl_clip.errors import UserError

# the modules the demo names, as `python -m` takes them, and the verb of mrl_clip's entry point each one runs
VERBS = {"mrl_clip.train": ["train"], "mrl_clip.eval": ["eval"], "mrl_clip": []}


def train(out: Path, name: str, steps: int, flags: list, done: str = "") -> Path:
    """`python -m mrl_clip.train FLAGS --logs OUT --name NAME --resume latest`, unless OUT/NAME already ended at
    `steps` with its export; returns OUT/NAME. `done` words the timing line (default: 'trained NAME')."""
    run_dir = out / name
    last = latest_checkpoint(run_dir / "checkpoints")
    if last is not None and last.name == f"step_{steps}.pt" and (run_dir / "export").is_dir():
        print(f"[demo] reusing finished run {run_dir}")
        return run_dir
    started = time.time()
    command("mrl_clip.train", *flags, "--logs", out, "--name", name, "--resume", "latest")
    print(f"[demo] {done or f'trained {name}'} in {time.time() - started:.0f} s", flush=True)
    return run_dir


def command(module: str, *args, quiet: bool = False) -> None:
    """`python -m MODULE ARGS`, printed first; quiet: its standard output discarded (its progress bars, on
    standard error, stay). A mistake is the command's own one-line error."""
    argv = [str(a) for a in args]
    print("[demo] python -m " + " ".join([module, *argv]), flush=True)
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull) if quiet else nullcontext():
        code = cli.main(VERBS[module] + argv)
    if code:  # the trainer's 75: pre-empted, its checkpoint written
        raise UserError(f"python -m {module} stopped with exit code {code}; re-run the demo to resume")


def export(run_dir: Path) -> str:
    return f"local-dir:{run_dir / 'export'}"


def evaluate(task: str, runs: dict, data: Path, out: Path, dims: list, *extra, output: str = "") -> dict:
    """`python -m mrl_clip.eval TASK` on the models (the first as --model, the others as --compare), as a user
    would run it, writing OUT/OUTPUT (default OUT/TASK.json); returns its JSON."""
    exports = [export(run_dir) for run_dir in runs.values()]
    path = out / (output or f"{task.replace('-', '_')}.json")
    compare = [flag for name in exports[1:] for flag in ("--compare", name)]
    command("mrl_clip.eval", task, "--model", exports[0], *compare, "--data", data, "--dims", ",".join(map(str, dims)),
            "--output", path, *extra)
    return json.loads(path.read_text())


def by_run(runs: dict, results: dict) -> dict:
    """An eval JSON's {label: entry} keyed by the demo's names of the runs instead (same order)."""
    return dict(zip(runs, results["models"].values()))
