"""The demo's last act: make an existing standard CLIP Matryoshka by a short fine-tune with the Matryoshka loss.

Starts from the demo's standard model (on a cluster: any open_clip pretrained tag, `--pretrained TAG`), trains
with `--dims 8,...,256` from its weights (`--pretrained FILE`: weights only, a fresh optimizer and schedule) and
evaluates zero-shot at every dim after each `SAVE_EVERY` steps: how many steps until the small prefixes are good,
and what happens to full-width accuracy.
"""
import json
from pathlib import Path

from mrl_clip.checkpoint import step_checkpoints
from mrl_clip.eval.report import plot_metrics, render_table
from mrl_clip.files import write_json
from pipelines import demo_commands

SAVE_EVERY = 25


def finetune(out: Path, model: str, start: Path, shards: str, dims: list, args) -> Path:
    """`python -m mrl_clip.train --pretrained START --dims DIMS` for args.mrlize_steps steps, a checkpoint every
    SAVE_EVERY steps (all kept: each is evaluated)."""
    steps = args.mrlize_steps
    return demo_commands.train(out, "mrlize", steps, [
        "--model", model, "--pretrained", start, "--train-data", shards, "--dims", ",".join(map(str, dims)),
        "--batch-size", args.batch_size, "--train-num-samples", steps * args.batch_size, "--epochs", 1,
        "--lr", args.mrlize_lr, "--warmup", 5, "--workers", 1, "--threads", args.threads, "--seed", args.seed + 1,
        "--save-every-n-steps", SAVE_EVERY, "--keep-checkpoints", 0, "--log-every-n-steps", 5],
        done="fine-tuned the standard model with the Matryoshka loss")


def evaluate_steps(run_dir: Path, model: str, start: Path, data: Path, dims: list) -> dict:
    """Zero-shot at every dim of the starting model and of each fine-tune checkpoint, in one
    `python -m mrl_clip.eval zeroshot` call; {label: {"dims", "metrics"}} with labels '0 steps', '25 steps', ..."""
    checkpoints = [(0, start)] + step_checkpoints(run_dir / "checkpoints")
    compare = [flag for _, path in checkpoints[1:] for flag in ("--compare", model, "--compare-pretrained", path)]
    output = run_dir / "zeroshot_by_step.json"
    demo_commands.command("mrl_clip.eval", "zeroshot", "--model", model, "--pretrained", start, *compare, "--data",
                          data, "--dims", ",".join(map(str, dims)), "--output", output, quiet=True)
    by_label = json.loads(output.read_text())["models"]
    return {f"{step} steps": entry for (step, _), entry in zip(checkpoints, by_label.values())}


def table(results: dict, dims: list) -> str:
    """acc1 (%) by fine-tune steps (rows) and dim (columns)."""
    rows = [[label] + [f"{100 * entry['metrics'][str(m)]['acc1']:.2f}" for m in dims]
            for label, entry in results.items()]
    return render_table(["fine-tune"] + [f"{m}-d" for m in dims], rows)


def steps_until_close(results: dict, dim: int, points: float) -> int:
    """The first checkpoint's step count at which `dim`'s acc1 is within `points` of that checkpoint's full-width
    acc1 (-1 if none is)."""
    for label, entry in results.items():
        metrics = entry["metrics"]
        if metrics[str(dim)]["acc1"] >= metrics[str(entry["dims"][-1])]["acc1"] - points / 100:
            return int(label.split()[0])
    return -1


def run(out: Path, model: str, start: Path, shards: str, data: Path, dims: list, args) -> dict:
    run_dir = finetune(out, model, start, shards, dims, args)
    results = evaluate_steps(run_dir, model, start, data, dims)
    plot_metrics(results, ["acc1"], out / "mrlize_accuracy_vs_dim.png",
                 title="Standard CLIP fine-tuned with the Matryoshka loss: zero-shot top-1 after N steps")
    first, last = results["0 steps"]["metrics"], list(results.values())[-1]["metrics"]
    small, full = str(dims[0]), str(dims[-1])
    summary = {"steps": args.mrlize_steps, "lr": args.mrlize_lr,
               "small_dim": dims[0], "small_before": first[small]["acc1"], "small_after": last[small]["acc1"],
               "full_before": first[full]["acc1"], "full_after": last[full]["acc1"],
               "steps_until_small_within_1pt_of_full": steps_until_close(results, dims[0], 1.0)}
    write_json({"summary": summary, "models": results}, out / "mrlize.json")
    print()
    print("Standard model fine-tuned with the Matryoshka loss, zero-shot top-1 (%):")
    print(table(results, dims))
    print(f"{small}-d: {100 * summary['small_before']:.1f} -> {100 * summary['small_after']:.1f}; "
          f"{full}-d: {100 * summary['full_before']:.2f} -> {100 * summary['full_after']:.2f} "
          f"after {args.mrlize_steps} steps")
    return summary
