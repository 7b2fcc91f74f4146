"""open_clip_train's flags in mrl_clip.train: the table (mrl_clip/train/open_clip_flags.py) against open_clip_train's
own parser and ours, then the flags this table's module family implements, end to end on the tiny shards: the
lr schedules against open_clip_train.scheduler at every step, epoch checkpoints that open_clip loads, remote sync
to a real local folder through open_clip_train's file_utils, and wandb in offline mode (real wandb, read back from
its own run file)."""
import json
import struct
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_train.scheduler import const_lr, const_lr_cooldown

from mrl_clip.train import main as train_main
from mrl_clip.train.open_clip_flags import (DIFFERENT, DOCS, FLAGS, REFUSED, SUPPORTED, captured_parser,
                                            open_clip_parser, render)
from tests.conftest import ROOT, TINY, TINY_DIMS, one_line_exit, run_module

REQUIRED = ["--model", TINY, "--train-data", "x.tar", "--dims", "256"]


def long_flags(parser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--") and a.dest != "help"}


@pytest.fixture(scope="module")
def parsers():
    return open_clip_parser(), captured_parser(train_main.parse_args, REQUIRED)


def test_every_open_clip_flag_is_in_the_table(parsers):
    theirs = set(long_flags(parsers[0]))
    assert theirs - set(FLAGS) == set(), f"open_clip_train flags missing from the table: {sorted(theirs - set(FLAGS))}"
    assert set(FLAGS) - theirs == set(), f"table rows open_clip_train does not have: {sorted(set(FLAGS) - theirs)}"


def sample_values(theirs, ours) -> list:
    """Arguments to parse a flag with (each choice of a flag with choices)."""
    if theirs.nargs == 0:
        return [[]]
    choices = theirs.choices or getattr(ours, "choices", None)
    if choices:
        return [[c] for c in choices]
    if isinstance(theirs.nargs, str) and theirs.nargs in "+*":
        return [["3", "4"]] if theirs.type in (int, float) else [["scale=(0.9,1.0)", "color_jitter=0.4"]]
    return [[{int: "3", float: "0.25"}.get(theirs.type, "some-value")]]


def test_supported_flags_parse_as_open_clip_parses_them(parsers):
    """Every "supported" flag: our parser gives the value open_clip_train's gives, for every sample value."""
    theirs, ours = (long_flags(p) for p in parsers)
    unknown = sorted(f for f, (status, _) in FLAGS.items() if status in (SUPPORTED, DIFFERENT) and f not in ours)
    mismatched = []
    for flag, (status, _) in FLAGS.items():
        if status != SUPPORTED or flag not in ours:
            continue
        for values in sample_values(theirs[flag], ours[flag]):
            expected = getattr(parsers[0].parse_args([flag, *values]), theirs[flag].dest)
            got = getattr(parsers[1].parse_args(REQUIRED + [flag, *values]), ours[flag].dest)
            if got != expected:
                mismatched.append(f"{flag} {' '.join(values)}: ours {got!r}, open_clip {expected!r}")
    assert not mismatched, mismatched
    assert not unknown, f"supported in the table but unknown to our parser: {unknown}"


def test_refused_flags_are_one_line_exit_2_naming_an_alternative(parsers, capfd):
    theirs = long_flags(parsers[0])
    for flag, (status, note) in FLAGS.items():
        if status != REFUSED:
            continue
        assert note, flag
        code, err = one_line_exit(train_main.main, REQUIRED + [flag, *sample_values(theirs[flag], None)[0]], capfd)
        assert code == 2 and err.count("\n") == 1, (flag, err)
        assert f"error: {flag} (open_clip_train's flag) is not supported by mrl_clip.train: {note}" in err


def test_docs_page_is_the_table():
    assert DOCS.read_text() == render(), ("docs/open_clip_flags.md is stale: PYTHONPATH=. python -c 'from "
                                          "mrl_clip.train.open_clip_flags import write_docs; write_docs()'")
    assert all(status in (SUPPORTED, DIFFERENT, REFUSED) and (status == SUPPORTED or note)
               for status, note in FLAGS.values())


# --- end to end -------------------------------------------------------------------------------------------------

BATCH, SAMPLES = 64, 256  # 4 optimizer steps an epoch, as open_clip_train counts them (256 // 64)


def run_flags(fmnist_data, logs, name, *extra):
    return [str(a) for a in ["--model", TINY, "--train-data", fmnist_data["train"], "--dims", ",".join(map(str, TINY_DIMS)),
            "--batch-size", str(BATCH), "--train-num-samples", str(SAMPLES), "--lr", "1e-3", "--warmup", "2",
            "--workers", "0", "--threads", "1", "--logs", logs, "--name", name, "--log-every-n-steps", "1",
            "--save-every-n-steps", "100", "--keep-checkpoints", "0", *extra]]


def logged_lrs(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "lr" in r}


def reference_lrs(make, steps: int) -> list:
    """open_clip_train's schedule function on an optimizer of its own, at steps 0..steps-1."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    schedule = make(optimizer)
    return [schedule(step) for step in range(steps)]


def wandb_records(run_file: Path):
    """The records of a wandb run file, decoded with wandb's own protobuf (the file is wandb's 7-byte header, then
    LevelDB log blocks of 32 KiB: 7-byte chunk headers, FULL/FIRST/MIDDLE/LAST chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.fixture(scope="module")
def plain_run(fmnist_data, tmp_path_factory):
    """Two epochs of 4 steps: const-cooldown over the last epoch, epoch files every epoch, the latest one and only
    the newest numbered one kept, remote sync by fsspec to a local folder, TensorBoard and wandb (offline)."""
    tmp = tmp_path_factory.mktemp("flags")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DIR", str(tmp))
    try:
        assert train_main.main(run_flags(
            fmnist_data, tmp / "logs", "run", "--epochs", "2", "--lr-scheduler", "const-cooldown",
            "--epochs-cooldown", "1", "--lr-cooldown-power", "2", "--lr-cooldown-end", "1e-4",
            "--save-frequency", "1", "--save-most-recent", "--delete-previous-checkpoint",
            "--remote-sync", tmp / "remote", "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "1",
            "--report-to", "all", "--wandb-project-name", "flags-test", "--wandb-notes", "a note", "--log-local")) == 0
    finally:
        mp.undo()
    return tmp / "logs" / "run", tmp / "remote" / "run", tmp / "wandb"


def test_const_cooldown_lr_is_open_clip_trains_at_every_step(plain_run):
    records = logged_lrs(plain_run[0])
    expected = reference_lrs(lambda opt: const_lr_cooldown(opt, 1e-3, 2, 8, 4, 2.0, 1e-4), 8)
    assert sorted(records) == list(range(1, 9))
    assert [records[s]["lr"] for s in range(1, 9)] == pytest.approx(expected, rel=1e-12)
    assert expected[0] < expected[4] == 1e-3 > expected[5]  # warm-up, constant, then cooling down


def test_epoch_checkpoints_are_open_clip_checkpoints_of_the_epoch_end(plain_run):
    run_dir = plain_run[0]
    folder = run_dir / "checkpoints"
    names = {p.name for p in folder.iterdir()}
    # epoch_1.pt went when epoch_2.pt came; step checkpoints at both epoch ends although --save-every-n-steps is 100
    assert {"epoch_2.pt", "epoch_latest.pt", "step_4.pt", "step_8.pt"} <= names and "epoch_1.pt" not in names
    assert (folder / "epoch_latest.pt").read_bytes() == (folder / "epoch_2.pt").read_bytes()
    checkpoint = torch.load(folder / "epoch_2.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["name"] == "run" and "optimizer" in checkpoint
    model = open_clip.create_model(TINY)
    open_clip.load_checkpoint(model, str(folder / "epoch_2.pt"))  # open_clip's own loader
    exported = open_clip.create_model("local-dir:" + str(run_dir / "export"))
    for (name, a), (_, b) in zip(model.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name


def test_remote_sync_copies_the_run_folder(plain_run):
    local, remote, _ = plain_run
    files = [p for p in local.rglob("*") if p.is_file() and p.name != "epoch_latest.pt"]  # open_clip skips it
    assert any(p.name == "epoch_2.pt" for p in files) and any(p.name == "log.jsonl" for p in files)
    for path in files:
        copy = remote / path.relative_to(local)
        assert copy.is_file() and copy.read_bytes() == path.read_bytes(), path
    assert not (remote / "checkpoints" / "epoch_latest.pt").exists()


def test_wandb_offline_run_holds_the_logged_scalars(plain_run):
    run_dir, _, wandb_dir = plain_run
    (run_file,) = wandb_dir.glob("offline-run-*/run-run.wandb")
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.run_id, run.notes) == ("flags-test", "run", "run", "a note")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    logged = logged_lrs(run_dir)
    assert sorted(logged) == sorted(s for s in history if "train/lr" in history[s])
    for step, record in logged.items():
        assert history[step]["train/lr"] == record["lr"] and history[step]["train/loss"] == record["loss"]
        assert history[step]["train/loss_dim8"] == record["loss_dim"]["8"]


def test_log_local_writes_the_local_masters_log(plain_run):
    run_dir = plain_run[0]
    assert not (run_dir / "out.log").exists()  # --log-local: out-RANK on each node's local rank 0, as open_clip
    lines = (run_dir / "out-0").read_text().splitlines()
    assert any(line.startswith("done: 8 steps") for line in lines)
    assert not any("\r" in line for line in lines)


def test_deepspeed_run_writes_the_epoch_file(fmnist_data, tmp_path):
    """--save-frequency 1 through DeepSpeed (ZeRO-2): epoch_1.pt holds the fp32 weights of the epoch's last step,
    which open_clip loads; --lr-scheduler const is open_clip_train's const_lr at every step."""
    result = run_module("mrl_clip.train", *run_flags(fmnist_data, tmp_path, "ds", "--epochs", "1", "--batch-size", "128",
                                                     "--lr-scheduler", "const", "--save-frequency", "1",
                                                     "--deepspeed", ROOT / "configs" / "ds_zero2_fp32.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ds"
    logged = (run_dir / "out.log").read_text()  # rank 0's text log, as open_clip's out.log (not --log-local)
    assert "done: 2 steps" in logged and "epoch 1: " in logged and "\r" not in logged
    records = logged_lrs(run_dir)
    assert [records[s]["lr"] for s in (1, 2)] == pytest.approx(reference_lrs(
        lambda opt: const_lr(opt, 1e-3, 2, 2), 2), rel=1e-12)
    checkpoint = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and "optimizer" not in checkpoint
    model = open_clip.create_model(TINY)
    open_clip.load_checkpoint(model, str(run_dir / "checkpoints" / "epoch_1.pt"))
    exported = open_clip.create_model("local-dir:" + str(run_dir / "export"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), exported.state_dict().values()))


@pytest.mark.parametrize("extra,message", [
    (["--lr-scheduler", "const-cooldown"], "needs --epochs-cooldown"),
    (["--lr-scheduler", "linear"], "--lr-scheduler takes cosine, const, const-cooldown"),
    (["--epochs-cooldown", "1"], "only applies with --lr-scheduler const-cooldown"),
    (["--opt", "timm/sgd"], "AdamW only"),
    (["--report-to", "wandb,tb"], "--report-to takes tensorboard, wandb or all"),
    (["--remote-sync", "/tmp/r", "--remote-sync-frequency", "0"], "--remote-sync-frequency must be at least 1"),
    (["--save-frequency", "-1"], "--save-frequency must be 0 or more"),
])
def test_bad_flag_values_are_one_line(capfd, extra, message):
    code, err = one_line_exit(train_main.main, REQUIRED + extra, capfd)
    assert code == 2 and err.count("\n") == 1 and message in err, err
