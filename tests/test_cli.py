"""The commands' wiring, and user mistakes as one line on stderr and exit code 2, never a traceback.

The entry point: `python -m mrl_clip VERB`, the `mrl-clip` console script of pyproject.toml, and the two module
spellings kept for users, torchrun and the SLURM scripts (`python -m mrl_clip.train`, `python -m mrl_clip.eval`).
Bad inputs: one table across every verb, the pipelines and the SLURM job scripts. A row is (name, command, words
the error line must hold); a row that needs files has a function that writes them and returns the command, run
only for its own case."""
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrl_clip import cli
from mrl_clip.errors import run_cli

from .conftest import ROOT, TINY, run_module

MARKER = "PWNED"  # a pickled payload in the table creates this folder if it is ever unpickled


def foreign_checkpoint(tmp):
    """An open_clip-format checkpoint whose weights belong to some other network."""
    path = tmp / "foreign.pt"
    torch.save({"epoch": 1, "state_dict": {"fc.weight": torch.zeros(3, 4)}}, path)
    return str(path)


def pickled_payload(tmp):
    """A checkpoint that also carries a pickled call, os.mkdir(tmp/PWNED), run by any unsafe load."""
    from .test_reliability import Payload
    path = tmp / "payload.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "extra": Payload(tmp / MARKER)}, path)
    return str(path)


def narrower_tiny_checkpoint(tmp):
    """A trainer-format checkpoint (weights and optimizer) of the tiny architecture with a 64-wide embedding."""
    import open_clip
    path = tmp / "tiny64.pt"
    model = open_clip.create_model(TINY, embed_dim=64)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"step": 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return str(path)


def clip_tiny_checkpoint(tmp):
    """A trainer-format checkpoint of the tiny architecture as a CLIP run leaves it (no logit_bias)."""
    import open_clip
    path = tmp / "tiny_clip.pt"
    model = open_clip.create_model(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"step": 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return str(path)


def siglip_tiny_checkpoint(tmp):
    """An open_clip checkpoint of the tiny architecture as a --siglip run leaves it (with a logit_bias)."""
    import open_clip
    path = tmp / "tiny_siglip.pt"
    torch.save({"step": 1, "state_dict": open_clip.create_model(TINY, init_logit_bias=-10.0).state_dict()}, path)
    return str(path)


def shards_with_sizes(data, tmp, sizes):
    """A copy of the training shards with the given sizes.json text."""
    folder = tmp / "shards"
    shutil.copytree(Path(data["train"]).parent, folder)
    (folder / "sizes.json").write_text(sizes)
    return str(folder / "train-{0000..0003}.tar")


def pairs_file(tmp, name, text):
    (tmp / "img.png").write_bytes(b"")  # only its existence is checked before anything is written
    (tmp / name).write_text(text)
    return str(tmp / name)


def eval_folder_without(data, tmp, name):
    folder = tmp / "eval"
    shutil.copytree(data["eval"], folder)
    os.remove(folder / name)
    return str(folder)


def eval_folder_of_type(data, tmp, kind):
    folder = tmp / "eval"
    shutil.copytree(data["eval"], folder)
    (folder / "dataset_type.txt").write_text(kind + "\n")
    return str(folder)


# what a job script sees inside an allocation, without a cluster (the rows stop before srun)
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1",
             "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}


def damaged_index_file(tmp):
    """An index file (`mrl_clip index build`) with one byte of its stored embeddings flipped."""
    from mrl_clip.search import build
    from mrl_clip.search.embed import save_embeddings

    save_embeddings(tmp / "emb.npz", torch.randn(50, 16), [f"i{i}" for i in range(50)], {"kind": "texts"})
    build.main(["build", "--embeddings", str(tmp / "emb.npz"), "--stage1", "binary@16", "--out", str(tmp / "x.index")])
    data = bytearray((tmp / "x.index").read_bytes())
    data[-300] ^= 0xFF
    (tmp / "x.index").write_bytes(bytes(data))
    return str(tmp / "x.index")


def bad_inputs(data, tmp):
    train = ["mrl_clip.train", "--model", TINY, "--train-data", data["train"], "--logs", tmp]
    zeroshot = ["mrl_clip.eval", "zeroshot", "--model", TINY, "--data", data["eval"]]
    return [
        ("dims not increasing", train + ["--dims", "64,32,256"], "strictly increasing"),
        ("dims zero", train + ["--dims", "0,256"], "positive"),
        ("dims above width", train + ["--dims", "8,512"], "above the embedding width"),
        ("dims not ending at width", train + ["--dims", "8,128"], "must end at the embedding width"),
        ("dims not numbers", train + ["--dims", "8,abc"], "comma-separated integers"),
        ("unknown model", ["mrl_clip.train", "--model", "ViT-Nope", "--train-data", data["train"],
                           "--dims", "256"], "unknown model"),
        ("missing shards", ["mrl_clip.train", "--model", TINY, "--train-data", str(tmp / "x-{0000..0003}.tar"),
                            "--dims", "256"], "missing shard"),
        ("resume missing", train + ["--dims", "256", "--resume", str(tmp / "nope.pt")], "not found"),
        ("missing flag", ["mrl_clip.train", "--model", TINY], "required"),
        ("eval data missing", ["mrl_clip.eval", "zeroshot", "--model", TINY, "--data", str(tmp / "none")],
                              "not found"),
        ("eval dims above width", zeroshot + ["--dims", "8,1024"], "above"),
        ("eval checkpoint missing", zeroshot + ["--pretrained", str(tmp / "missing.pt")], "not found"),
        ("eval folder not wds", ["mrl_clip.eval", "zeroshot", "--model", TINY, "--data", str(tmp)],
                                "nshards.txt"),
        ("eval unknown task", ["mrl_clip.eval", "bogus"], "invalid choice"),
        ("eval checkpoint of another model", lambda: zeroshot + ["--pretrained", foreign_checkpoint(tmp)],
                                             "does not fit"),
        ("resume checkpoint of another architecture",
            lambda: train + ["--dims", "256", "--resume", narrower_tiny_checkpoint(tmp)], "does not fit"),
        ("resume checkpoint with a pickled payload",
            lambda: train + ["--dims", "256", "--resume", pickled_payload(tmp)], "refused to load"),
        ("pretrained with a pickled payload",
            lambda: train + ["--dims", "256", "--pretrained", pickled_payload(tmp)], "refused to load"),
        ("eval checkpoint with a pickled payload",
            lambda: zeroshot + ["--pretrained", pickled_payload(tmp)], "refused to load"),
        ("empty shard list", ["mrl_clip.train", "--model", TINY, "--train-data", "", "--dims", "256"],
                             "names no shards"),
        ("sizes.json without a listed shard",
            lambda: ["mrl_clip.train", "--model", TINY, "--dims", "256", "--logs", tmp, "--train-data",
                     shards_with_sizes(data, tmp, json.dumps({"train-0000.tar": 512}))],
            "no entry for train-0001.tar"),
        ("sizes.json not JSON",
            lambda: ["mrl_clip.train", "--model", TINY, "--dims", "256", "--logs", tmp, "--train-data",
                     shards_with_sizes(data, tmp, "{oops")], "cannot read the dataset size"),
        ("max bad fraction above 1", train + ["--dims", "256", "--max-bad-fraction", "1.5"], "between 0 and 1"),
        ("max non-finite steps 0", train + ["--dims", "256", "--max-nonfinite-steps", "0"], "at least 1"),
        ("lr negative", train + ["--dims", "256", "--lr", "-1"], "--lr must be above 0, got -1.0"),
        ("lr not a number", train + ["--dims", "256", "--lr", "nan"], "--lr must be above 0, got nan"),
        ("wd negative", train + ["--dims", "256", "--wd", "-0.1"], "--wd must be 0 or more, got -0.1"),
        ("beta1 negative", train + ["--dims", "256", "--beta1", "-0.5"], "--beta1 must be in [0, 1), got -0.5"),
        ("beta2 1", train + ["--dims", "256", "--beta2", "1"], "--beta2 must be in [0, 1), got 1.0"),
        ("eps 0", train + ["--dims", "256", "--eps", "0"], "--eps must be above 0, got 0.0"),
        ("warmup negative", train + ["--dims", "256", "--warmup", "-5"], "--warmup must be 0 or more, got -5"),
        ("grad clip norm 0", train + ["--dims", "256", "--grad-clip-norm", "0"],
                             "--grad-clip-norm must be above 0, got 0.0"),
        ("eval folder without classnames.txt",
            lambda: ["mrl_clip.eval", "zeroshot", "--model", TINY, "--data",
                     eval_folder_without(data, tmp, "classnames.txt")], "has no classnames.txt"),
        ("eval unknown embedding precision", zeroshot + ["--embedding-precision", "float32,int4"],
                                             "unknown precision 'int4'"),
        ("embed unknown precision", ["mrl_clip", "embed", "--model", TINY, "--texts", tmp / "t.txt", "--output",
                                     tmp / "t.npz", "--precision", "int4"], "unknown precision 'int4'"),
        ("eval recall@0", ["mrl_clip.eval", "retrieval", "--model", TINY, "--data", data["eval"], "--recall-k", "0"],
                          "--recall-k must be positive"),
        ("csv with a missing image",
            lambda: ["pipelines.captions_to_shards", "--out", tmp / "out", "--input",
                     pairs_file(tmp, "pairs.csv", "image,caption\nimg.png,a cat\ngone.png,a dog\n")],
            "pairs.csv:3: image not found"),
        ("csv without a caption column",
            lambda: ["pipelines.captions_to_shards", "--out", tmp / "out", "--input",
                     pairs_file(tmp, "pairs.csv", "image,text\nimg.png,a cat\n")], "no column 'caption'"),
        ("jsonl line not JSON",
            lambda: ["pipelines.captions_to_shards", "--out", tmp / "out", "--input",
                     pairs_file(tmp, "pairs.jsonl", '{"image": "img.png", "caption": "a cat"}\n{"image": \n')],
            "pairs.jsonl:2: not valid JSON"),
        ("deepspeed config not JSON",
            lambda: train + ["--dims", "256", "--deepspeed", pairs_file(tmp, "ds.json", '{"zero_optimization": ')],
            "is not valid JSON"),
        ("deepspeed config missing", train + ["--dims", "256", "--deepspeed", tmp / "nope.json"],
                                     "DeepSpeed config not found"),
        ("slurm script run without sbatch", ["slurm/train_tiny.sh", {"SLURM_JOB_ID": ""}],
         "submit this script with sbatch"),
        ("slurm job without TRAIN_DATA", ["slurm/train_vitb.sh", {**SLURM_JOB, "TRAIN_DATA": ""}], "set TRAIN_DATA"),
        ("slurm job with a missing DeepSpeed config",
            ["slurm/train_tiny.sh", {**SLURM_JOB, "TRAIN_DATA": data["train"], "DS_CONFIG": str(tmp / "no.json")}],
            "DeepSpeed config not found"),
        ("val data missing", train + ["--dims", "256", "--val-data", tmp / "none"],
                             "--val-data: data folder not found"),
        ("val data not a CLIP_benchmark folder", train + ["--dims", "256", "--val-data", tmp], "no test/nshards.txt"),
        ("val data multilabel",
            lambda: train + ["--dims", "256", "--val-data", eval_folder_of_type(data, tmp, "multilabel")],
            "dataset_type.txt says 'multilabel'"),
        ("val every 0 steps", train + ["--dims", "256", "--val-data", data["eval"], "--val-every-n-steps", "0"],
                              "--val-every-n-steps must be at least 1"),
        ("val data under ZeRO-3",
            lambda: train + ["--dims", "256", "--val-data", data["eval"], "--deepspeed",
                             pairs_file(tmp, "ds.json", '{"zero_optimization": {"stage": 3}}')],
            "not supported under ZeRO stage 3"),
        ("open_clip flag refused", train + ["--dims", "256", "--horovod"], "--horovod (open_clip_train's flag) is not"),
        ("report to an unknown logger", train + ["--dims", "256", "--report-to", "tensorbord"],
                                        "--report-to takes tensorboard, wandb or all"),
        ("siglip resuming a CLIP run",
            lambda: train + ["--dims", "256", "--siglip", "--resume", clip_tiny_checkpoint(tmp)],
            "was trained without --siglip"),
        ("eval checkpoint of a siglip run by model name",
            lambda: zeroshot + ["--pretrained", siglip_tiny_checkpoint(tmp)], "holds a logit_bias"),
        ("siglip unknown exchange", train + ["--dims", "256", "--siglip", "--loss-dist-impl", "ring"],
                                    "invalid choice"),
        ("funnel precision drops", ["mrl_clip.eval", "retrieval", "--model", TINY, "--data", data["eval"],
                                    "--funnel", "int8@32:100,binary@256:10"], "precision must not drop"),
        ("funnel unknown precision", ["mrl_clip.eval", "retrieval", "--model", TINY, "--data", data["eval"],
                                      "--funnel", "int4@32:100,256:10"], "unknown precision 'int4'"),
        ("index file corrupt", lambda: ["mrl_clip", "index", "info", damaged_index_file(tmp)], "fails its checksum"),
        ("index stage 1 unknown precision",
            ["mrl_clip", "index", "build", "--embeddings", tmp / "none.npz", "--stage1", "hnsw32-int2@32",
             "--out", tmp / "x.index"], "unknown precision 'int2'"),
        ("csv empty caption",
            lambda: ["pipelines.captions_to_shards", "--out", tmp / "out", "--input",
                     pairs_file(tmp, "pairs.csv", "image,caption\nimg.png,  \n")], "pairs.csv:2: empty caption"),
        ("no verb", ["mrl_clip"], "a verb is required, one of train, eval, embed"),
        ("unknown verb", ["mrl_clip", "trian", "--model", TINY], "unknown verb 'trian'; choose from train, eval"),
    ]


CASES = [name for name, _, _ in bad_inputs({"train": "T", "eval": "E"}, Path("/nonexistent-folder"))]


# Modules whose main() the table calls in-process through run_cli, exactly what `python -m MODULE` runs (a
# subprocess per row would cost ~5 s of imports each); test_python_m_wiring checks each such `python -m` once.
IN_PROCESS = {"mrl_clip": "mrl_clip.cli", "mrl_clip.train": "mrl_clip.train.main",
              "mrl_clip.eval": "mrl_clip.eval.main",
              "pipelines.captions_to_shards": "pipelines.captions_to_shards"}


def run_row(args, capfd):
    """(exit code, stderr) of one table row: in-process for IN_PROCESS modules, else as a subprocess."""
    if str(args[0]).startswith("slurm/"):  # a job script: bash with the row's environment
        script, env = args
        result = subprocess.run(["bash", str(ROOT / script)], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, env={**os.environ, **env})
        return result.returncode, result.stderr
    args = [str(a) for a in args]
    if args[0] not in IN_PROCESS:
        result = run_module(*args, timeout=120)
        return result.returncode, result.stderr
    main = importlib.import_module(IN_PROCESS[args[0]]).main
    with pytest.raises(SystemExit) as exited:  # a bad input that is accepted fails here; any other error raises
        run_cli(main, args[1:])
    return exited.value.code, capfd.readouterr().err


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASES)
def test_bad_input_is_one_line_and_exit_2(index, fmnist_data, tmp_path, capfd):
    _, args, expected = bad_inputs(fmnist_data, tmp_path)[index]
    code, stderr = run_row(args() if callable(args) else args, capfd)
    assert code == 2, (code, stderr[-2000:])
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / MARKER).exists(), "a pickled payload was run"
    assert not (tmp_path / "out").exists(), "the pipeline wrote output before checking its input"


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_each_verb_runs_its_commands_main(verb, capfd):
    """`python -m mrl_clip VERB` with no flags reaches that command's own parser: one line naming the command
    (its prog: `python -m mrl_clip VERB`, or `python -m mrl_clip.train` / `.eval`) and a missing flag, exit 2."""
    with pytest.raises(SystemExit) as exited:
        run_cli(cli.main, [verb])
    stderr = capfd.readouterr().err
    lines = error_lines(stderr)
    assert exited.value.code == 2 and len(lines) == 1 and "required" in lines[0], stderr[-2000:]
    prog = lines[0].removeprefix("error: ").split(":")[0]
    assert prog in (f"python -m mrl_clip {verb}", f"python -m mrl_clip.{verb}"), lines[0]


def test_help_lists_every_verb(capsys):
    assert cli.main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.split("verbs:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(cli.VERBS)


# every `python -m` spelling, each run once as a user runs it (no flags at all: one line, exit 2)
PYTHON_M = [["mrl_clip", "index"], ["mrl_clip.train"], ["mrl_clip.eval"], ["pipelines.captions_to_shards"]]


@pytest.mark.parametrize("command", PYTHON_M, ids=" ".join)
def test_python_m_wiring(command):
    result = run_module(*command, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "required" in lines[0], result.stderr[-2000:]


def test_console_script_is_the_cli():
    """The `mrl-clip` entry of pyproject.toml's [project.scripts], parsed by importlib.metadata as pip reads it, run
    the way pip's generated script runs it (import the entry's object, sys.exit(object())). The venv's own
    mrl-clip, if any, was generated from whichever checkout was installed, so this checkout's entry is run."""
    import tomllib
    from importlib.metadata import EntryPoint

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = EntryPoint(name="mrl-clip", value=scripts["mrl-clip"], group="console_scripts")
    assert entry.load() is cli.run
    script = f"import sys\nfrom {entry.module} import {entry.attr}\nsys.exit({entry.attr}())"
    runs = {args: subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            for args in (("--help",), ("convert-deepspeed", "--out", "x"))}
    helped, failed = runs[("--help",)], runs[("convert-deepspeed", "--out", "x")]
    assert helped.returncode == 0 and all(f"  {verb} " in helped.stdout for verb in cli.VERBS), helped.stdout
    lines = error_lines(failed.stderr)
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr[-2000:]
    assert lines[0] == "error: python -m mrl_clip convert-deepspeed: the following arguments are required: ds_dir"


def test_shards_with_no_usable_sample_stop_with_a_message(tmp_path):
    from pipelines.shards import write_shards

    samples = ({"__key__": f"s{i}", "png": b"broken", "txt": "a caption"} for i in range(20))
    write_shards(samples, tmp_path, "train", shard_size=10)
    result = run_module("mrl_clip.train", "--model", TINY, "--train-data", tmp_path / "train-{0000..0001}.tar",
                        "--dims", "256", "--batch-size", "4", "--workers", "0", "--logs", tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no usable sample" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("module, verb", [("mrl_clip.towers", "towers"), ("mrl_clip.search.embed", "embed"),
                                          ("mrl_clip.train.convert_deepspeed", "convert-deepspeed")])
def test_modules_that_were_commands_name_the_verb(module, verb):
    """The old `python -m MODULE` spellings say in one line where the command went, rather than exit 0 silently."""
    result = run_module(module, "--help", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: this module is not a command; run: python -m mrl_clip {verb} ..."
