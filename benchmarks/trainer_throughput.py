"""Training throughput on one GPU: mrl_clip.train (plain amp_bf16, and DeepSpeed ZeRO-2 bf16) next to open_clip's
own trainer on the same card and model, in one run.

    python benchmarks/trainer_throughput.py --steps 80 [--model ViT-B-32-768] [--batch-size 256]

Ours reads WebDataset shards of small synthetic JPEGs (made here; decoding them is cheap, so the step, not the
loader, sets the pace); open_clip_train reads its `--dataset-type synthetic` images (its WebDataset reader fails on
webdataset 1.0.2). Both apply the model's 224-px train transform. Reported per trainer, after the first
`--warmup-steps` steps: median compute time per step (ours: forward, Matryoshka loss, backward, optimizer; open_clip:
its 'Batch (t)' minus 'Data (t)') and median samples/s end to end.
Writes benchmarks/results/trainer_throughput_<device>.json.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_shards(out: Path, shards: int, per_shard: int, size: int) -> str:
    from make_synthetic_shards import samples

    from pipelines.shards import brace_pattern, write_shards

    sizes = write_shards(samples(shards * per_shard, size, seed=0), out, "train", per_shard)
    return brace_pattern(out, "train", len(sizes))


def run(cmd, env):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    result = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stderr[-4000:]}")
    return result


def ours(args, shards, logs, name, extra, env):
    run([sys.executable, "-m", "mrl_clip.train", "--model", args.model, "--train-data", shards,
         "--dims", args.dims, "--batch-size", args.batch_size, "--max-steps", args.steps, "--epochs", 100,
         "--workers", args.workers, "--lr", "5e-4", "--warmup", "10", "--local-loss", "--gather-with-grad",
         "--logs", logs, "--name", name, "--log-every-n-steps", 1, "--save-every-n-steps", 10 ** 6, *extra], env)
    records = [json.loads(line) for line in (Path(logs) / name / "log.jsonl").read_text().splitlines()]
    records = records[args.warmup_steps:]
    return {"step_ms": 1000 * statistics.median(r["step_s"] for r in records),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in records), "steps_measured": len(records)}


OPEN_CLIP_LINE = re.compile(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.]+)/s")


def open_clip_trainer(args, logs, env):
    code = "import sys, mrl_clip; from open_clip_train.main import main; main(sys.argv[1:])"  # registers our configs
    result = run([sys.executable, "-c", code, "--dataset-type", "synthetic",
                  "--train-num-samples", args.batch_size * args.steps, "--batch-size", args.batch_size, "--epochs", 1,
                  "--model", args.model, "--precision", "amp_bf16", "--workers", args.workers, "--lr", "5e-4",
                  "--warmup", "10", "--local-loss", "--gather-with-grad", "--log-every-n-steps", 1,
                  "--logs", logs, "--name", "open_clip", "--save-frequency", 0], env)
    lines = OPEN_CLIP_LINE.findall(result.stdout + result.stderr)[args.warmup_steps:]
    if not lines:
        sys.exit("open_clip_train printed no step lines:\n" + (result.stdout + result.stderr)[-3000:])
    return {"step_ms": 1000 * statistics.median(float(b) - float(d) for d, b, _ in lines),
            "samples_per_s": statistics.median(float(s) for _, _, s in lines), "steps_measured": len(lines)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32-768")
    p.add_argument("--dims", default="32,64,128,256,512,768")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup-steps", type=int, default=15)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--image-size", type=int, default=64, help="stored JPEG size (the transform resizes to 224)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "shards", shards=16, per_shard=args.batch_size * 2, size=args.image_size)
        rows = {
            "mrl_clip.train amp_bf16": ours(args, shards, tmp / "runs", "plain", ["--precision", "amp_bf16"], env),
            "mrl_clip.train DeepSpeed ZeRO-2 bf16": ours(args, shards, tmp / "runs", "ds",
                                                         ["--deepspeed", ROOT / "configs" / "ds_zero2_bf16.json"], env),
            "mrl_clip.train DeepSpeed ZeRO-2 autocast bf16": ours(
                args, shards, tmp / "runs", "ds_autocast",
                ["--deepspeed", ROOT / "configs" / "ds_zero2_autocast_bf16.json"], env),
            "open_clip_train (synthetic data)": open_clip_trainer(args, tmp / "oc", env),
        }
    print(f"\n{args.model}, batch {args.batch_size}, dims {args.dims}, {device}, "
          f"median of {args.steps - args.warmup_steps} steps")
    print(f"{'trainer':46s} {'step ms':>8s} {'samples/s':>10s}")
    for name, row in rows.items():
        print(f"{name:46s} {row['step_ms']:8.1f} {row['samples_per_s']:10.0f}")
    result = {"model": args.model, "batch_size": args.batch_size, "dims": args.dims, "steps": args.steps,
              "warmup_steps": args.warmup_steps, "workers": args.workers, "device": device,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "trainers": rows}
    out = Path(args.out) / f"trainer_throughput_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
