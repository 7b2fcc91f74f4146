"""Nested (Matryoshka) dimension lists: parsing and validation shared by training and evaluation."""
from typing import Optional, Sequence

from .errors import UserError


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None


def parse_float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def check_dims(dims: Sequence[int], width: Optional[int] = None, must_end_at_width: bool = False) -> list[int]:
    """Strictly increasing positive ints, none above `width`; for training the last must equal `width`."""
    dims = list(dims)
    if not dims:
        raise UserError("--dims is empty")
    if any(not isinstance(m, int) or m <= 0 for m in dims):
        raise UserError(f"--dims must be positive integers, got {dims}")
    if any(b <= a for a, b in zip(dims, dims[1:])):
        raise UserError(f"--dims must be strictly increasing, got {dims}")
    if width is not None:
        if dims[-1] > width:
            raise UserError(f"--dims {dims} go above the embedding width {width}")
        if must_end_at_width and dims[-1] != width:
            raise UserError(f"--dims must end at the embedding width {width}, got {dims}")
    return dims


def check_weights(weights: Optional[Sequence[float]], dims: Sequence[int]) -> list[float]:
    if weights is None:
        return [1.0] * len(dims)
    weights = [float(w) for w in weights]
    if len(weights) != len(dims):
        raise UserError(f"--dim-weights has {len(weights)} values for {len(dims)} dims")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--dim-weights must be non-negative and not all zero, got {weights}")
    return weights
