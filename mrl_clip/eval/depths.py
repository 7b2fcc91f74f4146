"""Evaluation on the (layer, dim) grid of a 2D Matryoshka model: the one place the evaluation tasks encode at
several depths.

`--image-layers 2,4` / `--text-layers 2,4,6` name depths (transformer blocks run, mrl_clip.layers) of a tower. The
grid's rows are every (image depth, text depth) pair: the product of the two lists, a tower without its flag
standing at its full depth, so the main case (one tower layered) has one row per listed depth, the other tower at
full depth. Each tower's full depth is always evaluated too (appended when the list stops short): it is the row
the others are read against, and the entry's "metrics" (what the evaluation reports without the flags). The
columns are the dims, as ever.

Each sample goes once through its tower and every listed exit is read on the way (mrl_clip.layers.tower_exits),
so the grid costs about one full-depth encoding; the metrics then run once per (row, dim).
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import UserError
from ..layers import FLAGS, IMAGE, TEXT, check_layers, parse_layers, tower_depth, tower_exits


@dataclass(frozen=True)
class Grid:
    """The depths evaluated per tower (increasing, the tower's full depth last) and which towers were layered
    (named in the row labels and the JSON); a tower not layered is encoded the ordinary way, at full depth."""
    image: tuple
    text: tuple
    layered: tuple

    def depths(self, tower: str) -> Optional[list]:
        """The exits to read for `tower`, None when it is encoded at full depth only."""
        return list(getattr(self, tower)) if tower in self.layered else None

    def rows(self) -> list:
        """[(image index, text index)] of every (image depth, text depth) pair, image-major."""
        return [(i, t) for i in range(len(self.image)) for t in range(len(self.text))]

    def row_key(self, i: int, t: int) -> dict:
        """The JSON fields naming row (i, t): {"image_layers": l, "text_layers": l} for the layered towers."""
        return {f"{tower}_layers": getattr(self, tower)[index]
                for tower, index in ((IMAGE, i), (TEXT, t)) if tower in self.layered}


def add_layer_flags(sub, towers=(IMAGE, TEXT)) -> None:
    for tower in towers:
        sub.add_argument(FLAGS[tower], default=None, metavar="L,...",
                         help=f"also evaluate the {tower} tower after its first L layers (2D Matryoshka): a "
                              "(layer, dim) grid, each sample encoded once (see mrl_clip.eval.depths)")


def requested_layers(args) -> dict:
    """{tower: [depths] or None} from the flags (parsed; checked against a model by grid_for)."""
    requested = {tower: parse_layers(getattr(args, f"{tower}_layers", None), FLAGS[tower]) for tower in FLAGS}
    if any(requested.values()) and getattr(args, "adaptor", None):
        raise UserError("--adaptor is fit to the full-depth embeddings: it does not combine with "
                        f"{FLAGS[IMAGE]} / {FLAGS[TEXT]}")
    return requested


def grid_for(model, requested: dict) -> Optional[Grid]:
    """The model's Grid for the requested depths (None when none are requested): each list checked against its
    tower (one line for a tower without layer exits, depths past its depth or not increasing)."""
    if not any(v is not None for v in requested.values()):
        return None
    lists = {}
    for tower in (IMAGE, TEXT):
        layers = requested.get(tower)
        if layers is None:
            lists[tower] = (None,)  # full depth, by the ordinary encoder (the tower may have no exits)
            continue
        depth = tower_depth(model, tower)
        layers = check_layers(layers, depth, FLAGS[tower], must_end_at_depth=False)
        lists[tower] = tuple(layers if layers[-1] == depth else layers + [depth])
    return Grid(lists[IMAGE], lists[TEXT], tuple(t for t in (IMAGE, TEXT) if requested.get(t) is not None))


def encode_batch(model, tower: str, inputs, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Unnormalised float CPU features: [B, D] from encode_image / encode_text when `layers` is None, else
    [exits, B, D] from one pass through the tower. Concatenate batches along dim -2."""
    if layers is None:
        encode = model.encode_image if tower == IMAGE else model.encode_text
        return encode(inputs).float().cpu()
    return torch.stack(tower_exits(model, tower, inputs, layers)).float().cpu()


def at_exit(features: torch.Tensor, grid: Optional[Grid], tower: str, index: int) -> torch.Tensor:
    """The features of one exit: features[index] of a layered tower's [exits, ...], the features themselves
    otherwise."""
    return features[index] if grid is not None and tower in grid.layered else features


def full_depth(features: torch.Tensor, grid: Optional[Grid], tower: str) -> torch.Tensor:
    return at_exit(features, grid, tower, -1)


def grid_metrics(grid: Grid, metrics_at) -> list:
    """[{**row_key, "metrics": {"<dim>": {...}}}] over the grid's rows; metrics_at(i, t) -> {dim: {...}}."""
    return [{**grid.row_key(i, t), "metrics": {str(m): v for m, v in metrics_at(i, t).items()}}
            for i, t in grid.rows()]


def grid_entry(grid: Grid, rows: list, towers=(IMAGE, TEXT)) -> dict:
    """The JSON fields a layered evaluation adds beside "dims" and "metrics": "layers" {tower: depths} of the
    layered towers and "grid", a row per (depth, ...) pair."""
    return {"layers": {t: list(getattr(grid, t)) for t in towers if t in grid.layered}, "grid": rows}
