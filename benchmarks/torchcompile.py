"""--torchcompile's gain: training steps/s of a model compiled in place (nn.Module.compile, inductor, what
mrl_clip.train --torchcompile does) against the same model eager, in one run.

    python benchmarks/torchcompile.py [--models MRL-Tiny-28,ViT-B-32-768] [--batch-size 32] [--rounds 8]

One step: forward, MatryoshkaClipLoss over the model's dims, backward, AdamW, on a fixed random batch (the data
loader is not measured). Eager and compiled copies of the same initial weights alternate step by step, so load
drift on a shared machine cancels in each round's ratio; the compile time (the compiled copy's first step, less a
median eager step) is reported on its own. Writes benchmarks/results/torchcompile.json.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def step_fn(model, loss, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        image, text, scale = model(*batch)
        loss(image, text, scale)[0].backward()
        optimizer.step()
        return time.perf_counter() - start
    return step


def measure(name: str, batch_size: int, rounds: int) -> dict:
    import open_clip

    from mrl_clip import models
    from mrl_clip.loss import MatryoshkaClipLoss

    torch.manual_seed(0)
    eager = models.create(name)[0].train()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    size = eager.visual.preprocess_cfg["size"]
    batch = (torch.randn(batch_size, 3, *size), open_clip.get_tokenizer(name)(["a photo of a shirt"] * batch_size))
    width = models.embed_width(name)
    loss = MatryoshkaClipLoss([d for d in (8, 16, 32, 64, 128, 256, 512, 768) if d < width] + [width])
    run_eager, run_compiled = step_fn(eager, loss, batch), step_fn(compiled, loss, batch)
    first_eager = run_eager()
    first_compiled = run_compiled()  # compiles forward and backward
    pairs = [(run_eager(), run_compiled()) for _ in range(rounds)]
    eager_s, compiled_s = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"model": name, "batch_size": batch_size, "rounds": rounds,
            "eager_steps_per_s": 1 / statistics.median(eager_s),
            "compiled_steps_per_s": 1 / statistics.median(compiled_s),
            "speedup": statistics.median(e / c for e, c in pairs),
            "compile_s": first_compiled - statistics.median(eager_s), "first_eager_step_s": first_eager}


def main(argv=None) -> int:
    from common import machine, write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="MRL-Tiny-28,ViT-B-32-768")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'model':<16} {'batch':>5} {'eager steps/s':>14} {'compiled steps/s':>17} {'speedup':>8} "
          f"{'compile s':>10}", flush=True)
    rows = []
    for name in args.models.split(","):  # the table and the JSON grow model by model
        r = measure(name, args.batch_size, args.rounds)
        rows.append(r)
        print(f"{r['model']:<16} {r['batch_size']:>5} {r['eager_steps_per_s']:>14.2f} "
              f"{r['compiled_steps_per_s']:>17.2f} {r['speedup']:>8.2f} {r['compile_s']:>10.1f}", flush=True)
        write_result("torchcompile", {"rows": rows, "machine": machine(args.threads),
                                      "device": "cpu", "backend": "inductor"}, quick=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
