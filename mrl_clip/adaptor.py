"""A Matryoshka adaptor (mrl_clip.adapt learns one): the map f applied to a model's full-width embeddings before any
prefix is sliced, its safetensors file, and a model seen through it (what embed, search and eval --adaptor use).

The file holds the map's tensors and metadata {"format": "mrl_clip.adaptor/1", "dims", "width", "hidden"}.
"""
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .dims import check_dims, parse_int_list
from .errors import UserError
from .files import atomic_write

FORMAT = "mrl_clip.adaptor/1"


class MatryoshkaAdaptor(torch.nn.Module):
    def __init__(self, width: int, dims, hidden: int = 0, trainable: bool = False):
        super().__init__()
        self.dims, self.width, self.hidden = check_dims(dims, width, must_end_at_width=True), width, hidden
        self.linear = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(width))
        if trainable:
            # W stays orthogonal while it trains, so every full-width similarity stays as it was: what the
            # prefixes gain costs nothing there. `finished()` turns the parametrisation back into a plain weight.
            torch.nn.utils.parametrizations.orthogonal(self.linear, orthogonal_map="cayley")
        if hidden:
            self.up = torch.nn.Linear(width, hidden)
            self.down = torch.nn.Linear(hidden, width, bias=False)
            torch.nn.init.zeros_(self.down.weight)

    def finished(self) -> "MatryoshkaAdaptor":
        if torch.nn.utils.parametrize.is_parametrized(self.linear):
            torch.nn.utils.parametrize.remove_parametrizations(self.linear, "weight")
        return self.eval()

    def residual(self, x):
        """The MLP's part of f(x) (zeros without one)."""
        return self.down(F.gelu(self.up(x))) if self.hidden else torch.zeros_like(x)

    def forward(self, x):
        return self.linear(x) + self.residual(x) if self.hidden else self.linear(x)


def save_adaptor(adaptor: MatryoshkaAdaptor, path) -> None:
    meta = {"format": FORMAT, "dims": ",".join(map(str, adaptor.dims)), "width": str(adaptor.width),
            "hidden": str(adaptor.hidden)}
    tensors = {k: v.detach().contiguous() for k, v in adaptor.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_adaptor(path, width: int | None = None) -> MatryoshkaAdaptor:
    """The adaptor in `path`; width: that of the embeddings it will map (a mismatch is one line)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        adaptor = MatryoshkaAdaptor(int(meta["width"]), parse_int_list(meta["dims"], "dims"), int(meta["hidden"]))
        adaptor.load_state_dict(load_file(str(path)))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{path} is not an adaptor written by mrl_clip adapt ({err})") from None
    if width is not None and width != adaptor.width:
        raise UserError(f"the adaptor {path} maps {adaptor.width}-d embeddings; these are {width}-d")
    return adaptor.eval()


@torch.no_grad()
def adapt_embeddings(adaptor: MatryoshkaAdaptor, embeddings) -> torch.Tensor:
    """f(x) of full-width embeddings, float32 (slice and re-normalise after it, as for any embedding)."""
    return adaptor(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))


class AdaptedModel(torch.nn.Module):
    """A CLIP model whose encode_image / encode_text return f(z / |z|) of its own embeddings z, for commands that
    take --adaptor (embed, search, eval); every other attribute is the model's."""

    def __init__(self, model, adaptor: MatryoshkaAdaptor):
        super().__init__()
        self.model, self.adaptor = model, adaptor

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def _adapted(self, z, normalize: bool):
        z = self.adaptor(F.normalize(z.float(), dim=-1))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, image, normalize: bool = False):
        return self._adapted(self.model.encode_image(image), normalize)

    def encode_text(self, text, normalize: bool = False):
        return self._adapted(self.model.encode_text(text), normalize)


def adaptor_identity(path) -> dict | None:
    """{"path", "sha256"} of an adaptor file (what caches and embeddings files record), None for no adaptor."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"--adaptor: no such file: {path}")
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def with_adaptor(model, path, width: int):
    """The model itself without an adaptor path, else the model seen through the adaptor in `path`."""
    return model if path is None else AdaptedModel(model, load_adaptor(path, width)).eval()
