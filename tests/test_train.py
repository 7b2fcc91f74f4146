import json
import subprocess
import sys
import open_clip
import pytest
import torch

from mrl_clip.eval.zeroshot import evaluate_zeroshot, load_classification_folder
from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train.loop import train_step
from mrl_clip.train.plain_engine import PlainEngine

from .conftest import TINY, TINY_DIMS, run_module
from .test_distributed import Towers, free_port


def test_training_learns_zero_shot_far_above_chance(trained_run, fmnist_data):
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(trained_run["checkpoint"]))
    data = load_classification_folder(str(fmnist_data["eval"]), preprocess)
    metrics = evaluate_zeroshot(model, open_clip.get_tokenizer(TINY), data, TINY_DIMS)
    # chance is 10% on 10 classes; the budget is 128 steps of batch 64
    for m in TINY_DIMS:
        assert metrics[m]["acc1"] > 0.3, (m, metrics)


def test_loss_falls_and_every_dim_is_logged(trained_run):
    records = [json.loads(line) for line in (trained_run["dir"] / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 128
    assert set(records[0]["loss_dim"]) == {str(m) for m in TINY_DIMS}
    first, last = records[0]["loss_dim"], records[-1]["loss_dim"]
    for m in first:
        assert last[m] < first[m] - 0.5, (m, first[m], last[m])
    assert records[-1]["bad_samples"] == 0
    assert records[-1]["logit_scale"] <= 100.0 + 1e-4


def test_checkpoint_is_open_clip_format_and_loads_in_open_clip(trained_run):
    assert trained_run["checkpoint"].name == "step_128.pt"
    checkpoint = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=True)
    assert {"epoch", "name", "state_dict", "optimizer", "step"} <= set(checkpoint)
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=str(trained_run["checkpoint"]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key


def test_local_dir_export_loads_in_plain_open_clip(trained_run, tmp_path):
    script = (
        "import sys, torch, open_clip\n"
        f"model, _, _ = open_clip.create_model_and_transforms('local-dir:{trained_run['export']}')\n"
        "assert 'mrl_clip' not in sys.modules\n"
        f"tok = open_clip.get_tokenizer('local-dir:{trained_run['export']}')(['a photo of a bag.'])\n"
        "torch.manual_seed(0)\n"
        f"torch.save({{'text': model.encode_text(tok), 'image': model.encode_image(torch.randn(2, 3, 28, 28))}},"
        f" '{tmp_path / 'out.pt'}')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=str(trained_run["checkpoint"]))
    tok = open_clip.get_tokenizer(TINY)(["a photo of a bag."])
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.allclose(out["text"], model.encode_text(tok), atol=1e-6)
        assert torch.allclose(out["image"], model.encode_image(torch.randn(2, 3, 28, 28)), atol=1e-6)


def test_accum_freq_batches_give_the_gradient_of_one_big_batch():
    """--accum-freq K, open_clip's meaning: K loader batches of B make one step whose gradient is that of one
    batch of K x B samples (every sample a negative for every other)."""
    def grads(batches):
        model = Towers()
        engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler(enabled=False))
        train_step(engine, MatryoshkaClipLoss([4, 8, 16]), batches)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 10, generator=g), torch.randn(16, 12, generator=g)
    whole = grads([(x, y)])
    accumulated = grads([(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)])
    for name in whole:
        assert torch.allclose(whole[name], accumulated[name], atol=1e-6, rtol=1e-5), name


def test_resume_latest_continues_from_the_last_checkpoint(fmnist_data, tmp_path):
    common = ["mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"], "--dims", "32,256",
              "--batch-size", "64", "--epochs", "1", "--warmup", "2", "--workers", "1", "--threads", "2",
              "--logs", tmp_path, "--name", "r", "--save-every-n-steps", "8", "--log-every-n-steps", "1"]
    first = run_module(*common, "--max-steps", "12")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_module(*common, "--resume", "latest")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "at step 12" in second.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 33))
    assert (tmp_path / "r" / "checkpoints" / "step_32.pt").is_file()
    checkpoint = torch.load(tmp_path / "r" / "checkpoints" / "step_32.pt", weights_only=True)
    assert checkpoint["step"] == 32 and checkpoint["epoch"] == 1 and checkpoint["dims"] == [32, 256]


@pytest.mark.slow
def test_torchrun_two_gloo_ranks(fmnist_data, tmp_path):
    result = run_module("torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), "-m",
                        "mrl_clip.train", "--model", TINY, "--train-data", fmnist_data["train"],
                        "--dims", "16,64,256", "--batch-size", "32", "--epochs", "1", "--workers", "1",
                        "--threads", "1", "--local-loss", "--gather-with-grad", "--output-dir", tmp_path,
                        "--name", "ddp", "--max-steps", "6", "--log-every-n-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # rank 0 alone writes the log
    assert records[0]["samples_per_s"] > 0
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "step_6.pt", weights_only=True)
    assert checkpoint["world_size"] == 2
    assert not any(k.startswith("module.") for k in checkpoint["state_dict"])
