"""The plain PyTorch engine of mrl_clip.train (one process, or DDP): forward, backward and optimizer step, and its
checkpoints in open_clip's format (weights, optimizer, plus what an exact resume needs)."""
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from open_clip_train.train import unwrap_model
from timm.optim import param_groups_weight_decay

from ..checkpoint import latest_checkpoint, load_checkpoint_file, newest_loadable_checkpoint, prune_checkpoints
from ..errors import UserError
from ..files import atomic_torch_save
from .engine import LOGIT_SCALE_MAX, RunState



def clamp_logit_scale(model) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def make_optimizer(model, lr: float, wd: float, betas: tuple, eps: float, groups=None):
    """AdamW over the trainable parameters, with no weight decay on 1-d ones (gains, biases, norms, logit_scale)
    or biases: timm's param_groups_weight_decay, which on our models splits as open_clip_train's main() does
    (tests/test_train.py compares them); or over `groups` (layer_decay's, split the same way)."""
    return torch.optim.AdamW(groups or param_groups_weight_decay(model, wd), lr=lr, betas=betas, eps=eps)


def gradients_finite(model) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


class PlainEngine:
    """A model (or DDP model), its torch optimizer, a GradScaler (enabled for --precision amp only) and
    --grad-clip-norm."""

    def __init__(self, model, optimizer, scaler: torch.amp.GradScaler, grad_clip_norm: Optional[float] = None,
                 rank: int = 0, world_size: int = 1):
        self.model, self.optimizer, self.scaler, self.grad_clip_norm = model, optimizer, scaler, grad_clip_norm
        self.rank, self.world_size = rank, world_size

    def __call__(self, images, texts):
        return self.model(images, texts)

    def train(self) -> None:
        self.model.train()

    def eval_model(self):
        """The model validation encodes with (under DDP the module itself: rank 0 alone runs it)."""
        return unwrap_model(self.model)

    def distribute(self, device: torch.device) -> None:
        """Wrap the model in DDP (after any resume: DDP broadcasts rank 0's weights)."""
        ddp_args = {} if device.type == "cpu" else {"device_ids": [device]}
        self.model = torch.nn.parallel.DistributedDataParallel(self.model, **ddp_args)

    def no_sync(self, last: bool):
        """DDP all-reduces gradients on the last backward of a step only."""
        return self.model.no_sync() if not last and hasattr(self.model, "no_sync") else nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        """False: a gradient was not finite, and nothing changed. Under DDP the gradients are already
        all-reduced, so every rank decides alike. With --precision amp, GradScaler skips overflowing steps itself
        (it lowers the scale and tries again: not counted as skipped)."""
        if not self.scaler.is_enabled() and not gradients_finite(self.model):
            self.zero_grad()
            return False
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        clamp_logit_scale(unwrap_model(self.model))
        return True

    def save_checkpoint(self, checkpoint_dir: Path, state: RunState, keep: int) -> None:
        """checkpoint_dir/step_N.pt in open_clip's format (rank 0 writes; the ranks hold the same weights)."""
        if self.rank != 0:
            return
        payload = {**state.to_dict(), "state_dict": unwrap_model(self.model).state_dict(),
                   "optimizer": self.optimizer.state_dict()}
        if self.world_size == 1:
            payload["rng"] = [rng_state()]
        if self.scaler.is_enabled():
            payload["scaler"] = self.scaler.state_dict()
        atomic_torch_save(payload, Path(checkpoint_dir) / f"step_{state.step}.pt")
        prune_checkpoints(checkpoint_dir, keep)

    def last_checkpoint(self, checkpoint_dir: Path) -> Optional[Path]:
        return latest_checkpoint(checkpoint_dir)

    def load_checkpoint(self, resume: Optional[str], checkpoint_dir: Path, run: RunState) -> tuple:
        """(the state resumed from, whether the RNG state was restored) from --resume: 'latest' (the newest
        step_N.pt that loads; none: a fresh start, as open_clip does) or a checkpoint file."""
        if resume is None:
            return None, False
        if resume == "latest":
            found = newest_loadable_checkpoint(checkpoint_dir)
            if found is None:
                return None, False
            path, checkpoint = found
        else:
            path = Path(resume)
            if not path.is_file():
                raise UserError(f"--resume checkpoint not found: {resume}")
            checkpoint = load_checkpoint_file(path)
        saved = RunState.from_dict(checkpoint)
        if saved.siglip is None:  # ours say; for other open_clip checkpoints a logit_bias tells
            saved.siglip = "logit_bias" in checkpoint["state_dict"]
        run.check_resumes(path, saved)
        self.load(path, checkpoint, run.model)
        restored = "rng" in checkpoint and saved.world_size == self.world_size == 1
        if restored:
            set_rng_state(checkpoint["rng"][0])
        return saved, restored

    def load(self, path: Path, checkpoint: dict, model_name: str) -> None:
        if "optimizer" not in checkpoint:
            raise UserError(f"{path} holds weights only (a DeepSpeed run's fp32 copy): resume that run with "
                            "--deepspeed, or start from these weights with --pretrained")
        model = unwrap_model(self.model)
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            raise UserError(f"{path} does not fit model {model_name}: {str(err).splitlines()[0]}") from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler.is_enabled() and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        clamp_logit_scale(model)

    def export_model(self, checkpoint_dir: Path, step: int):
        """The trained open_clip model (rank 0 calls it after the last save)."""
        return unwrap_model(self.model)
