"""Linear classification heads on nested prefixes of a frozen embedding (MRL and MRL-E linear probes).

Heads are saved in their own safetensors file beside a checkpoint, never inside open_clip's state_dict
(open_clip loads that strictly, so extra keys would break plain `create_model_and_transforms`).
"""
import json
import numbers
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write
from .dims import check_dims
from .errors import UserError

FORMAT = "mrl_clip.heads/1"


class MRLHeads(torch.nn.Module):
    """MRL: one `Linear(m, C)` per dim m, applied to x[:, :m].
    MRL-E (`efficient=True`): one shared `Linear(d, C)`, d = dims[-1]; dim m uses its first m input columns,
    logits_m = x[:, :m] @ W[:, :m].T + b, so all dims together cost the parameters of one full-width head.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, efficient: bool = False):
        super().__init__()
        self.dims = check_dims(dims)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.efficient = bool(efficient)
        if self.efficient:
            self.shared = torch.nn.Linear(self.dims[-1], num_classes)
        else:
            self.heads = torch.nn.ModuleList(torch.nn.Linear(m, num_classes) for m in self.dims)

    def linear_weights(self) -> list:
        """The weight matrices (not biases) the training penalty applies to."""
        return [self.shared.weight] if self.efficient else [h.weight for h in self.heads]

    def forward(self, x) -> dict:
        if x.shape[-1] < self.dims[-1]:
            raise ValueError(f"features of width {x.shape[-1]} are narrower than dims {self.dims}")
        if self.efficient:
            w, b = self.shared.weight, self.shared.bias
            return {m: F.linear(x[:, :m], w[:, :m], b) for m in self.dims}
        return {m: head(x[:, :m]) for m, head in zip(self.dims, self.heads)}


def save_heads(path, heads: MRLHeads, meta: dict) -> Path:
    """One safetensors file, written atomically. Structure and `meta` go in its JSON header; tensor values of
    `meta` (e.g. the train mean/std the heads expect) are stored as tensors named `meta/<key>`."""
    import safetensors.torch

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    plain = {}
    for key, value in (meta or {}).items():
        if isinstance(value, torch.Tensor):
            tensors[f"meta/{key}"] = value.detach().contiguous().cpu()
        else:
            plain[key] = value
    header = {"format": FORMAT, "dims": heads.dims, "num_classes": heads.num_classes,
              "efficient": heads.efficient, "meta": plain}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(
        tensors, tmp, metadata={"mrl_heads": json.dumps(header)}))


def load_heads(path):
    """(MRLHeads, meta). Reads safetensors only, so a pickle (or any other file) is refused, never executed."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"heads file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = json.loads((f.metadata() or {})["mrl_heads"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise UserError(f"{path} is not an mrl_clip heads file (safetensors): "
                        f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path}: unknown heads format {header.get('format')!r}")
    heads = MRLHeads(header["dims"], header["num_classes"], header["efficient"])
    state = {k: v for k, v in tensors.items() if not k.startswith("meta/")}
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: tensors do not match its header: {str(err).splitlines()[0][:200]}") from None
    meta = dict(header["meta"])
    meta.update({k[len("meta/"):]: v for k, v in tensors.items() if k.startswith("meta/")})
    return heads, meta
