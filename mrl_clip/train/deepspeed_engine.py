"""The DeepSpeed engine of mrl_clip.train: its config, its part of loop.train_step, and its checkpoints (the fp32
open_clip export from them is convert_deepspeed's).

What the engine needs that plain DDP does not, and why:
- open_clip's `logit_scale` (and a SigLIP model's `logit_bias`) is a 0-dim parameter; `deepspeed.initialize`
  (ZeRO's flat buffers) and ZeRO-0's fp32 gradient clipping cannot take one, so the engine trains it reshaped to
  [1]; every state dict we write reshapes it back, so checkpoints and exports stay open_clip's.
- with bf16/fp16 the engine holds low-precision weights and the fp32 masters live in the (partitioned) optimizer:
  the fp32 open_clip checkpoint is rebuilt from DeepSpeed's own checkpoint with its `zero_to_fp32` tool (at the
  end of a run, or by convert_deepspeed: it reads every rank's optimizer state, too slow for every save), and the
  logit_scale clamp is applied to the fp32 master, not only to the bf16 copy.
- DeepSpeed's checkpoints are written by every rank and loaded by DeepSpeed itself (pickle, `weights_only=False`):
  they are this run's own files. Our `latest` pointer is written atomically after every rank has finished.
"""
import json
import logging
import os
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint import prune_checkpoints
from ..errors import UserError
from ..files import atomic_write
from .convert_deepspeed import SCALARS, STEP_TAG, client_state, latest_tag, step_tag, write_open_clip_checkpoint
from .engine import LOGIT_SCALE_MAX, RunState


def load_config(path, batch_size: int, accum_freq: int, world_size: int, grad_clip_norm) -> dict:
    """A plain DeepSpeed JSON; the batch sizes come from our flags (DeepSpeed checks they agree): a micro-batch is
    one loader batch of --batch-size, and --accum-freq of them make a step."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    if "optimizer" in config or "scheduler" in config:
        raise UserError(f"{path}: leave 'optimizer' and 'scheduler' out; mrl_clip.train sets AdamW and the "
                        "cosine schedule from its flags (--lr, --wd, --warmup, ...)")
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise UserError(f"{path}: fp16 and bf16 are both enabled")
    if zero_stage(config) not in (1, 2, 3):
        raise UserError(f"{path}: set zero_optimization.stage to 1, 2 or 3 (ZeRO-0 is plain data parallelism: "
                        "train without --deepspeed)")
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = accum_freq
    config["train_batch_size"] = batch_size * accum_freq * world_size
    config.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW, as in the DDP path
    if grad_clip_norm is not None:
        config["gradient_clipping"] = grad_clip_norm
    else:
        config.setdefault("gradient_clipping", 0.0)  # DeepSpeed's default is 1.0; the DDP path does not clip
    config.setdefault("steps_per_print", 10 ** 9)  # our log.jsonl reports
    return config


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed wants a process group even for one process (else it tries MPI discovery)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def vector_logit_scale(model) -> None:
    """logit_scale, and logit_bias where the model has one, reshaped to [1]."""
    for name in SCALARS:
        if getattr(model, name, None) is not None:
            setattr(model, name, torch.nn.Parameter(getattr(model, name).detach().reshape(1)))


def initialize(model, optimizer, config: dict):
    """`model` must already carry the [1]-shaped logit_scale (vector_logit_scale, before its optimizer is made)."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would bury our progress bar
    try:
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    except (ValueError, AssertionError) as err:
        # DeepSpeed's own config checks (unknown keys, bad ZeRO stage, ...) — the user's JSON
        raise UserError(f"DeepSpeed rejected the config: {str(err).splitlines()[0][:300]}") from None
    return engine, ds_optimizer


def input_dtype(engine):
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def clamp_logit_scale(engine, max_value: float = LOGIT_SCALE_MAX) -> None:
    """open_clip's clamp, on the fp32 master too: with bf16 weights the engine's copy is not what AdamW steps."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = engine.module.logit_scale
    master = safe_get_full_fp32_param(param)  # collective under ZeRO: every rank calls it
    if master is not None and (master < 0 or master > max_value).any():
        safe_set_full_fp32_param(param, master.clamp(0, max_value))
    with torch.no_grad():
        # the copy the forward uses: the whole tensor under ZeRO-1/2; under ZeRO-3 the module's tensor is an empty
        # placeholder and this rank's partition (ds_tensor) is what the next forward gathers
        working = param.ds_tensor if hasattr(param, "ds_tensor") else param
        working.clamp_(0, max_value)


def save(engine, ds_dir: Path, step: int, record: dict, keep: int) -> str:
    """Every rank writes its part, with `record` as its client state; then rank 0 points `latest` at it
    (atomically) and prunes old tags."""
    tag = step_tag(step)
    engine.save_checkpoint(str(ds_dir), tag=tag, client_state=record, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write(Path(ds_dir) / "latest", lambda tmp: Path(tmp).write_text(tag))
        prune_checkpoints(ds_dir, keep, STEP_TAG, spare=Path(ds_dir) / tag)
    dist.barrier()
    return tag


def load(engine, ds_dir: Path, tag: str) -> None:
    load_path, _ = engine.load_checkpoint(str(ds_dir), tag=tag)
    if load_path is None:
        raise UserError(f"DeepSpeed checkpoint {Path(ds_dir) / tag} could not be loaded")


class CastImages:
    """What validation calls of a model whose weights are in `dtype` (bf16 / fp16): images cast to it, as the
    training forward does."""

    def __init__(self, module, dtype):
        self.module, self.dtype = module, dtype

    def encode_image(self, images):
        return self.module.encode_image(images.to(self.dtype))

    def encode_text(self, texts):
        return self.module.encode_text(texts)

    def eval(self):
        self.module.eval()
        return self


def zero_stage(config: dict) -> int:
    return config.get("zero_optimization", {}).get("stage", 0)


class DeepSpeedEngine:
    """The same calls as plain_engine.PlainEngine, through a DeepSpeed engine. A step of --accum-freq micro-batches
    is DeepSpeed's gradient accumulation: the engine reduces gradients and steps the optimizer at the boundary."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.dtype = input_dtype(engine)

    def __call__(self, images, texts):
        # texts are floating point when they are a cached text tower's features (--feature-cache)
        return self.engine(images.to(self.dtype), texts.to(self.dtype) if texts.is_floating_point() else texts)

    def train(self) -> None:
        self.engine.train()

    def eval_model(self):
        """The module validation encodes with on rank 0 alone: whole on every rank under ZeRO-1/2 (ZeRO-3
        partitions it; main.py refuses --val-data there)."""
        return CastImages(self.engine.module, self.dtype)

    def no_sync(self, last: bool):
        return nullcontext()  # DeepSpeed reduces at the accumulation boundary by itself

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes the gradients after each optimizer step by itself

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # each pass's loss is the whole step's: no 1/accum scaling
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro-batch

    def step(self) -> bool:
        """The optimizer step. False when a gradient was not finite: ZeRO's optimizers check the gradient norm
        (any stage, fp32 and bf16 alike), skip the update and zero the gradients, on every rank."""
        self.engine.step()
        if not self.engine.was_step_applied():
            return False
        clamp_logit_scale(self.engine)
        return True

    def save_checkpoint(self, checkpoint_dir: Path, state: RunState, keep: int) -> None:
        """Every rank writes its part of checkpoint_dir/deepspeed/step_N (the open_clip-format step_N.pt comes at
        the end only: export_model)."""
        save(self.engine, Path(checkpoint_dir) / "deepspeed", state.step, state.to_dict(), keep)

    def last_checkpoint(self, checkpoint_dir: Path) -> Optional[Path]:
        tag = latest_tag(Path(checkpoint_dir) / "deepspeed")
        return Path(checkpoint_dir) / "deepspeed" / tag if tag else None

    def load_checkpoint(self, resume: Optional[str], checkpoint_dir: Path, run: RunState) -> tuple:
        """(the state resumed from, False: DeepSpeed keeps no RNG state) from --resume: 'latest' (DeepSpeed's
        newest complete checkpoint of this run; none yet: a fresh start) or a checkpoint folder
        RUN/checkpoints/deepspeed/step_N."""
        if resume is None:
            return None, False
        if resume == "latest":
            folder = self.last_checkpoint(checkpoint_dir)
            if folder is None:
                return None, False
        else:
            folder = Path(resume)
        saved = client_state(folder.parent, folder.name)  # checked before DeepSpeed unpickles anything
        if saved.siglip is None:
            saved.siglip = False
        run.check_resumes(folder, saved)
        load(self.engine, folder.parent, folder.name)
        return saved, False

    def export_model(self, checkpoint_dir: Path, step: int):
        """Rank 0, after the last save: the fp32 weights rebuilt from DeepSpeed's checkpoint, written as
        checkpoint_dir/step_N.pt in open_clip's format (weights only) and returned as an open_clip model."""
        return write_open_clip_checkpoint(Path(checkpoint_dir) / "deepspeed", step_tag(step),
                                          Path(checkpoint_dir) / f"step_{step}.pt")[1]
