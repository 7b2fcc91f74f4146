"""One process, one DeepSpeed engine at the ZeRO stage given: loop.train_step on a batch whose gradient is made
NaN (a hook on one weight) must skip the step and leave every fp32 master weight as it was; the next step, with
the hook removed, must update them. The engine is checked against the Engine protocol too. Prints what happened
as JSON (tests/test_deepspeed_step.py runs it)."""
import json
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param

from mrl_clip import models
from mrl_clip.loss import MatryoshkaClipLoss
from mrl_clip.train import deepspeed_engine
from mrl_clip.train.engine import Engine
from mrl_clip.train.loop import train_step

BATCH = 8


def fp32_weights(engine) -> dict:
    return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}


def main(stage: int) -> dict:
    torch.manual_seed(0)
    model = models.create("MRL-Tiny-28")[0]
    deepspeed_engine.vector_logit_scale(model)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "train_batch_size": BATCH,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    deepspeed_engine.ensure_process_group(torch.device("cpu"))
    ds, _ = deepspeed_engine.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), config)
    engine = deepspeed_engine.DeepSpeedEngine(ds, "MRL-Tiny-28")
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(BATCH, 3, 28, 28, generator=g), torch.randint(1, 1000, (BATCH, 16), generator=g))
    loss_fn = MatryoshkaClipLoss([8, 256])

    before = fp32_weights(ds)
    poison = ds.module.visual.conv1.weight.register_hook(lambda grad: grad * float("nan"))
    poisoned = train_step(engine, loss_fn, [batch])
    after_skip = fp32_weights(ds)
    poison.remove()
    clean = train_step(engine, loss_fn, [batch])
    after_step = fp32_weights(ds)
    return {"loss_finite": poisoned.loss == poisoned.loss, "skipped": [poisoned.skipped, clean.skipped],
            "unchanged_after_skip": [n for n in before if not torch.equal(before[n], after_skip[n])] == [],
            "changed_by_next_step": sorted(n for n in before if not torch.equal(after_skip[n], after_step[n])),
            "finite": all(bool(torch.isfinite(w).all()) for w in after_step.values()),
            "parameters": sorted(before), "is_engine": isinstance(engine, Engine)}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(int(sys.argv[1]))))
