"""The DeepSpeed path of mrl_clip.train: config, engine, one training step, checkpoints and fp32 export.

What the engine needs that plain DDP does not, and why:
- open_clip's `logit_scale` is a 0-dim parameter; `deepspeed.initialize` (ZeRO's flat buffers) and ZeRO-0's fp32
  gradient clipping cannot take one, so the engine trains it reshaped to [1]; every state dict we write reshapes
  it back, so checkpoints and exports stay open_clip's.
- with bf16/fp16 the engine holds low-precision weights and the fp32 masters live in the (partitioned) optimizer:
  the fp32 open_clip checkpoint is rebuilt from DeepSpeed's own checkpoint with its `zero_to_fp32` tool, and the
  logit_scale clamp is applied to the fp32 master, not only to the bf16 copy.
- DeepSpeed's checkpoints are written by every rank and loaded by DeepSpeed itself (pickle, `weights_only=False`):
  they are this run's own files. Our `latest` pointer is written atomically after every rank has finished.
"""
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from ..files import atomic_write

TAG_PREFIX = "step_"


def load_config(path, batch_size: int, accum_freq: int, world_size: int, grad_clip_norm) -> dict:
    """A plain DeepSpeed JSON; the batch sizes come from our flags (DeepSpeed checks they agree)."""
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
    if config.get("zero_optimization", {}).get("stage", 0) not in (1, 2, 3):
        raise UserError(f"{path}: set zero_optimization.stage to 1, 2 or 3 (ZeRO-0 is plain data parallelism: "
                        "train without --deepspeed)")
    config["train_micro_batch_size_per_gpu"] = batch_size // accum_freq
    config["gradient_accumulation_steps"] = accum_freq
    config["train_batch_size"] = batch_size * world_size
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
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))


def open_clip_state_dict(state_dict: dict) -> dict:
    """Engine weights → open_clip's layout: 0-dim logit_scale, fp32, on the CPU."""
    out = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in state_dict.items()}
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


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


def train_step(engine, loss_fn, images, texts, accum_freq: int):
    """One optimizer step through the engine: the same maths as mrl_clip.train.train_step (open_clip's feature
    caching across micro-batches; logit_scale's gradient from one pass). The loss runs in fp32 whatever the
    weights' precision. Returns (total, per_dim, logit_scale, stepped); a non-finite loss on any rank skips the step
    on every rank before anything reaches the engine (no half-done accumulation)."""
    images = images.to(input_dtype(engine))
    if accum_freq == 1:
        image_features, text_features, logit_scale = engine(images, texts)
        total, per_dim = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        if not all_finite(total):
            return total, per_dim, logit_scale, False
        engine.backward(total)
        engine.step()
        return total, per_dim, logit_scale, True
    image_chunks, text_chunks = images.chunk(accum_freq), texts.chunk(accum_freq)
    with torch.no_grad():
        cached = [tuple(x.float() for x in engine(i, t)[:2]) for i, t in zip(image_chunks, text_chunks)]
    for j, (i, t) in enumerate(zip(image_chunks, text_chunks)):
        image_j, text_j, logit_scale = engine(i, t)
        if j > 0:
            logit_scale = logit_scale.detach()
        all_images = torch.cat([c[0] for c in cached[:j]] + [image_j.float()] + [c[0] for c in cached[j + 1:]])
        all_texts = torch.cat([c[1] for c in cached[:j]] + [text_j.float()] + [c[1] for c in cached[j + 1:]])
        total, per_dim = loss_fn(all_images, all_texts, logit_scale.float())
        if j == 0 and not all_finite(total):
            return total, per_dim, logit_scale, False
        engine.backward(total, scale_wrt_gas=False)  # each pass is the whole batch's loss: no 1/accum scaling
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
    return total, per_dim, logit_scale, True


def all_finite(loss) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def clamp_logit_scale(engine, max_value: float) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = engine.module.logit_scale
    master = safe_get_full_fp32_param(param)  # collective under ZeRO: every rank calls it
    if master is not None and (master < 0 or master > max_value).any():
        safe_set_full_fp32_param(param, master.clamp(0, max_value))
    with torch.no_grad():
        param.clamp_(0, max_value)


def step_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def latest_tag(ds_dir: Path):
    pointer = Path(ds_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (Path(ds_dir) / tag).is_dir() else None


def save(engine, ds_dir: Path, step: int, client_state: dict, keep: int) -> str:
    """Every rank writes its part; then rank 0 points `latest` at it (atomically) and prunes old tags."""
    tag = step_tag(step)
    engine.save_checkpoint(str(ds_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write(Path(ds_dir) / "latest", lambda tmp: Path(tmp).write_text(tag))
        prune_tags(Path(ds_dir), keep)
    dist.barrier()
    return tag


def step_tags(ds_dir: Path) -> list[tuple[int, str]]:
    if not Path(ds_dir).is_dir():
        return []
    found = []
    for entry in os.listdir(ds_dir):
        if entry.startswith(TAG_PREFIX) and entry[len(TAG_PREFIX):].isdigit() and (Path(ds_dir) / entry).is_dir():
            found.append((int(entry[len(TAG_PREFIX):]), entry))
    return sorted(found)


def prune_tags(ds_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    current = latest_tag(ds_dir)
    for _, tag in step_tags(ds_dir)[:-keep]:
        if tag != current:
            shutil.rmtree(Path(ds_dir) / tag, ignore_errors=True)


def load(engine, ds_dir: Path, tag: str) -> dict:
    load_path, client_state = engine.load_checkpoint(str(ds_dir), tag=tag)
    if load_path is None:
        raise UserError(f"DeepSpeed checkpoint {Path(ds_dir) / tag} could not be loaded")
    return client_state or {}


def client_state(ds_dir: Path, tag: str) -> dict:
    """What mrl_clip.train stored beside the weights (step, epoch, model, dims, ...), read without pickle."""
    folder = Path(ds_dir) / tag
    # ZeRO-1/2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_R_mp_rank_00_model_states.pt per rank
    candidates = [folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UserError(f"not a DeepSpeed checkpoint folder (no mp_rank_00_model_states.pt): {folder}")
    states = torch.load(path, map_location="cpu", weights_only=True)
    return {k: states[k] for k in ("step", "epoch", "name", "model", "dims", "dim_weights", "world_size", "seed")
            if k in states}


def open_clip_checkpoint(ds_dir: Path, tag: str) -> dict:
    """An open_clip checkpoint (fp32 weights, no optimizer) from a DeepSpeed checkpoint of mrl_clip.train."""
    return {**client_state(ds_dir, tag), "state_dict": fp32_state_dict(ds_dir, tag), "deepspeed": tag}


def fp32_state_dict(ds_dir: Path, tag: str) -> dict:
    """open_clip's fp32 state dict rebuilt from a DeepSpeed checkpoint folder (any ZeRO stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with quiet_stdout():
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    return open_clip_state_dict(state_dict)


@contextmanager
def quiet_stdout():
    """zero_to_fp32 prints its progress on every save; errors still raise."""
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), redirect_stderr(devnull):
        yield
