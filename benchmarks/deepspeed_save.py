"""What a DeepSpeed save costs with and without rebuilding the open_clip-format fp32 file (zero_to_fp32).

Until this benchmark, rank 0 rebuilt RUN/checkpoints/step_N.pt from DeepSpeed's checkpoint at every save: it reads
every rank's optimizer partitions back from disk and writes the fp32 weights again. This measures, at ViT-B size on
one process (ZeRO-2, fp32, CPU: the rebuild runs on the CPU on a GPU node too), DeepSpeed's own save and the
rebuild, interleaved, and their ratio; and the rebuild's share of a save interval at the GPU step time measured
earlier (benchmarks/results/trainer_throughput_cuda.json, default --save-every-n-steps 200).

    python benchmarks/deepspeed_save.py [--model ViT-B-32-768] [--rounds 3] [--quick]
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, machine, median_ratio, write_result

from mrl_clip import models
from mrl_clip.eval.report import render_table
from mrl_clip.files import atomic_torch_save
from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train import deepspeed_engine
from mrl_clip.train.convert_deepspeed import open_clip_checkpoint
from mrl_clip.train.loop import train_step
from mrl_clip.train.plain_engine import make_optimizer

GPU_STEP = ("mrl_clip.train DeepSpeed ZeRO-2 autocast bf16", 200)  # trainer_throughput_cuda.json row, save interval


def engine_with_optimizer_state(model_name: str, batch: int):
    model = models.create(model_name)[0]
    deepspeed_engine.vector_logit_scale(model)
    optimizer = make_optimizer(model, lr=1e-4, wd=0.2, betas=(0.9, 0.98), eps=1e-6)
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "train_batch_size": batch,
              "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    deepspeed_engine.ensure_process_group(torch.device("cpu"))
    ds, _ = deepspeed_engine.initialize(model, optimizer, config)
    cfg = models.model_config(model_name)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size)
    texts = torch.randint(1, cfg["text_cfg"]["vocab_size"], (batch, cfg["text_cfg"].get("context_length", 77)))
    engine = deepspeed_engine.DeepSpeedEngine(ds, model_name)
    train_step(engine, MatryoshkaClipLoss([cfg["embed_dim"]]), [(images, texts)])  # AdamW state exists now
    return ds, sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32-768")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="MRL-Tiny-28, 2 rounds: checks the script runs")
    args = p.parse_args()
    if args.quick:
        args.model, args.rounds = "MRL-Tiny-28", 2
    ds, parameters = engine_with_optimizer_state(args.model, batch=2)
    save_s, rebuild_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ds_dir = Path(tmp) / "deepspeed"
        machine_at_start = machine()
        for step in range(1, args.rounds + 1):
            start = time.perf_counter()
            tag = deepspeed_engine.save(ds, ds_dir, step, {"step": step, "model": args.model}, keep=2)
            save_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            atomic_torch_save(open_clip_checkpoint(ds_dir, tag), Path(tmp) / f"step_{step}.pt")
            rebuild_s.append(time.perf_counter() - start)
    ratio = median_ratio(rebuild_s, save_s)
    gpu = json.loads((RESULTS / "trainer_throughput_cuda.json").read_text())
    step_ms = gpu["trainers"][GPU_STEP[0]]["step_ms"]
    interval_s = GPU_STEP[1] * step_ms / 1000
    share = statistics.median(rebuild_s) / (interval_s + statistics.median(rebuild_s))
    rows = [["DeepSpeed save_checkpoint", f"{statistics.median(save_s):.2f}", "1.00"],
            ["zero_to_fp32 rebuild + step_N.pt", f"{statistics.median(rebuild_s):.2f}", f"{ratio:.2f}"]]
    print(f"{args.model}, {parameters / 1e6:.0f} M parameters, ZeRO-2 fp32, one process, {args.rounds} rounds")
    print(render_table(["what", "seconds (median)", "x save"], rows))
    print(f"rebuild's share of a save interval of {GPU_STEP[1]} steps at {step_ms:.1f} ms ({gpu['device']}, "
          f"trainer_throughput_cuda.json): {100 * share:.0f}%")
    write_result("deepspeed_save", {
        "model": args.model, "parameters": parameters, "rounds": args.rounds, "save_s": save_s,
        "rebuild_s": rebuild_s, "rebuild_over_save": ratio,
        "gpu_step_ms": step_ms, "gpu_device": gpu["device"], "save_every_n_steps": GPU_STEP[1],
        "rebuild_share_of_save_interval": share, "machine": machine_at_start}, args.quick)


if __name__ == "__main__":
    main()
