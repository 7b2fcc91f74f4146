"""Matryoshka prefixes: the first m dims of an embedding, L2-normalised again (slice, then re-normalise).

The one home of that view for the package: numpy rows in blocks (`chunks`, `normalized_prefix`, `prefix_norms`;
the rows may be a float16 memory map larger than a float32 copy of them) and torch features for evaluation
(`normalized_prefix_tensor`, torch.nn.functional.normalize). A zero row stays zero in both.
"""
import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 65536  # rows per block: a float32 block of 65,536 rows x 768 dims is 192 MiB


def chunks(x, dim: int | None = None):
    """Contiguous float32 blocks of CHUNK rows of x[:, :dim] (all columns when dim is None), in row order."""
    for start in range(0, len(x), CHUNK):
        yield np.ascontiguousarray(x[start:start + CHUNK, :dim], dtype=np.float32)


def normalized_blocks(x, dim: int):
    """The re-normalised dim-prefixes of x's rows, one float32 block of CHUNK rows at a time."""
    for block in chunks(x, dim):
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        yield np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)


def normalized_prefix(x, dim: int) -> np.ndarray:
    """Contiguous float32 rows x[:, :dim] / ||x[:, :dim]||, normalised block by block (no float32 copy of x)."""
    out = np.empty((len(x), dim), dtype=np.float32)
    for start, block in zip(range(0, len(x), CHUNK), normalized_blocks(x, dim)):
        out[start:start + len(block)] = block
    return out


def prefix_norms(x, dim: int) -> np.ndarray:
    """[rows] float32 ||x[:, :dim]||, block by block."""
    return np.concatenate([np.linalg.norm(block, axis=1) for block in chunks(x, dim)])


def normalized_prefix_tensor(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x[..., :dim] / ||x[..., :dim]|| of torch features (F.normalize, as open_clip normalises its features)."""
    return F.normalize(x[..., :dim], dim=-1)
