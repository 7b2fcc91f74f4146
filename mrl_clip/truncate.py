"""A Matryoshka model cut into a real, smaller one: the first m embedding dims, the first l transformer layers.

    python -m mrl_clip truncate --model local-dir:RUN/export --dim 96 [--image-layers 6] [--text-layers 3] --out DIR

DIR is an open_clip export (open_clip_config.json + open_clip_model.safetensors, the format of
mrl_clip.checkpoint.export_local_dir) that plain open_clip loads — `open_clip.create_model_and_transforms(
"local-dir:DIR")`, `open_clip.get_tokenizer("local-dir:DIR")`, no mrl_clip needed — whose normalised embeddings
are the re-normalised m-prefix of the full model's tower output after its first l layers (mrl_clip.layers' exits),
up to float32 rounding: the kept blocks, norms and pooling are the same modules with the same weights, and each
projection keeps its first m output columns, so every kept output is the same dot product.

What is cut, by tower (anything else a config holds that depends on embed_dim is refused in one line, naming the
tensor that cannot be sliced exactly):
- open_clip's transformer towers (VisionTransformer, CLIP's built-in text tower, TextTransformer): vision_cfg /
  text_cfg `layers` = l, resblocks >= l dropped; `proj` / `text_projection` columns (a Linear's rows) kept to m.
- a timm image tower (ALIGN-Lite0-MiniLM-384's EfficientNet): dim only, the head's linear projection's rows; a CNN
  has no layer exits (mrl_clip.layers refuses --image-layers on it).
- a Hugging Face text tower (HFTextEncoder): dim only, its linear projection's rows. Its depth is not open_clip's
  to set: HFTextEncoder builds the transformer from AutoConfig.from_pretrained(text_cfg.hf_model_name), the hub
  config by name, and open_clip_config.json has no field that overrides num_hidden_layers (CLIPTextCfg takes
  none, and local-dir: loading reads only the tokenizer from the folder), so a shallower HF tower would not load in
  plain open_clip; --text-layers below its depth is refused in one line.

Nesting (mrl_clip.nesting, the rule every verb shares): a cut at a dim or depth the source was not trained to nest
is allowed, with one warning line (Kusupati et al. show untrained prefixes between trained ones interpolate in
accuracy; the user decides, the eval verbs measure it), and so is a source with no nesting record, with one warning
that its prefixes were never trained. The output records its own nesting (the source's dims below m, plus m; its
depths below l, plus l) and, under "truncated_from", the source's width and depths and what was cut untrained.

The output is written in a temporary folder beside --out and renamed into place, so an interrupted run leaves no
folder that looks like an export.
"""
import json
import os
import shutil
import tempfile
from copy import deepcopy
from pathlib import Path
from typing import Optional

from .errors import ArgumentParser, UserError, not_a_command
from .layers import FLAGS, IMAGE, TEXT, check_layers, tower_depth, tower_kind

# the tensors that map a tower's pooled features to the embedding: slicing their output axis to m is exact.
# Parameters x @ P have it last, nn.Linear weights (and biases) first.
PROJECTIONS = {"visual.proj": -1, "text_projection": -1, "text.text_projection": -1,
               "text_projection.weight": 0, "text_projection.bias": 0,
               "text.text_projection.weight": 0, "text.text_projection.bias": 0,
               "text.proj.weight": 0, "visual.head.proj.weight": 0, "visual.head.proj.bias": 0}
# where each kind of transformer tower keeps its blocks, and which config's `layers` sets their number
BLOCKS = {IMAGE: {"vit": ("visual.transformer.resblocks.", "vision_cfg")},
          TEXT: {"clip-text": ("transformer.resblocks.", "text_cfg"),
                 "text-transformer": ("text.transformer.resblocks.", "text_cfg")}}


def parse_args(argv):
    p = ArgumentParser(prog="python -m mrl_clip truncate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the export to cut, local-dir:PATH (a training run's export/)")
    p.add_argument("--dim", type=int, default=None, help="embedding dims kept, 1..width (default: the width)")
    p.add_argument("--image-layers", type=int, default=None,
                   help="transformer blocks the image tower keeps (default: all)")
    p.add_argument("--text-layers", type=int, default=None,
                   help="transformer blocks the text tower keeps (default: all)")
    p.add_argument("--out", required=True, help="the new export's folder (must not exist, or be empty)")
    args = p.parse_args(argv)
    if args.dim is None and args.image_layers is None and args.text_layers is None:
        raise UserError(f"{p.prog}: nothing to cut: give --dim, --image-layers and/or --text-layers")
    return args


def source_folder(name: str) -> Path:
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    from .models import LOCAL_DIR, local_dir

    folder = local_dir(name)
    if folder is None:
        raise UserError(f"--model {name}: give an export as {LOCAL_DIR}PATH (a training run's export/ folder)")
    if not folder.is_dir():
        raise UserError(f"--model {name}: no such folder")
    if not (folder / HF_CONFIG_NAME).is_file():
        raise UserError(f"--model {name}: not an open_clip export (no {HF_CONFIG_NAME} in that folder)")
    if not any((folder / w).is_file() for w in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)):
        raise UserError(f"--model {name}: the export has no weights ({HF_SAFE_WEIGHTS_NAME})")
    return folder


def check_out(out: Path):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new one")


def plan(model, config: dict, dim: Optional[int], layers: dict) -> dict:
    """The cut, checked against the model: {"dim": m, "width": D, "layers": {tower: (l, depth)}} (only towers
    whose depth is cut)."""
    width = int(config["model_cfg"]["embed_dim"])
    if "multimodal_cfg" in config["model_cfg"]:
        raise UserError("CoCa models are not supported: their text decoder depends on the embedding width")
    m = width if dim is None else dim
    if not 0 < m <= width:
        raise UserError(f"--dim {m}: must be in 1..{width} (the embedding width)")
    cut = {}
    for tower, l in layers.items():
        if l is None:
            continue
        kind = tower_kind(model, tower)  # one line for a tower without layer exits (a timm CNN)
        depth = tower_depth(model, tower)
        check_layers([l], depth, FLAGS[tower], must_end_at_depth=False)
        if l == depth:
            continue
        if kind == "hf":
            raise UserError(f"{FLAGS[tower]} {l}: a Hugging Face text tower's depth cannot be cut in an open_clip "
                            f"export: open_clip builds it from the hub config of "
                            f"{config['model_cfg']['text_cfg']['hf_model_name']!r} ({depth} layers) and "
                            "open_clip_config.json cannot override that (only --dim cuts this tower)")
        cut[tower] = (l, depth, kind)
    return {"dim": m, "width": width, "layers": cut}


def cut_depths(cut: dict) -> dict:
    """{tower: ([l], full depth)} of the towers the cut shortens (mrl_clip.nesting's `depths`)."""
    return {tower: ([l], depth) for tower, (l, depth, _) in cut["layers"].items()}


def new_config(config: dict, cut: dict) -> dict:
    cfg = deepcopy(config["model_cfg"])
    cfg["embed_dim"] = cut["dim"]
    for tower, (l, _, kind) in cut["layers"].items():
        cfg[BLOCKS[tower][kind][1]]["layers"] = l
    return cfg


def new_nesting(nesting: dict, cut: dict, missed: list) -> dict:
    from .checkpoint import nesting_record

    m = cut["dim"]
    dims = [d for d in nesting.get("matryoshka_dimensions", []) if d < m] + [m]
    layers = {}
    for tower in (IMAGE, TEXT):
        recorded = nesting.get("matryoshka_layers", {}).get(tower)
        if tower in cut["layers"]:
            l = cut["layers"][tower][0]
            layers[tower] = [x for x in (recorded or []) if x < l] + [l]
        elif recorded:
            layers[tower] = recorded
    record = nesting_record(dims, layers.get(IMAGE), layers.get(TEXT))
    depths = {tower: depth for tower, (_, depth, _) in cut["layers"].items()}
    record["truncated_from"] = {"embed_dim": cut["width"], "layers": depths, "untrained": missed,
                                "nesting": nesting}
    return record


def sliced_state(source: dict, target: dict, cut: dict) -> dict:
    """The source's tensors in the smaller model's shapes: blocks past l dropped, projections' outputs cut to m;
    anything else of another shape is refused."""
    dropped = [prefix for tower, (l, _, kind) in cut["layers"].items() for prefix in
               [BLOCKS[tower][kind][0] + f"{i}." for i in range(l, cut["layers"][tower][1])]]
    extra = [k for k in source if k not in target and not any(k.startswith(p) for p in dropped)]
    if extra:
        raise UserError(f"cannot cut this model exactly: the smaller model has no {extra[0]}")
    out = {}
    for key, like in target.items():
        if key not in source:
            raise UserError(f"cannot cut this model exactly: the smaller model has a {key} the source lacks")
        tensor = source[key]
        if tensor.shape != like.shape and key in PROJECTIONS:
            axis = PROJECTIONS[key] % tensor.dim()
            tensor = tensor.narrow(axis, 0, cut["dim"])
        if tensor.shape != like.shape:
            raise UserError(f"cannot cut this model exactly: {key} {tuple(source[key].shape)} would have to become "
                            f"{tuple(like.shape)}, and it is not a final projection (only those are cut exactly)")
        out[key] = tensor
    return out


def write_export(source_dir: Path, config: dict, tensors: dict, out: Path):
    """Tokenizer files copied from the source, weights, then the config (what makes a folder loadable), all in a
    temporary folder beside `out` renamed into place at the end."""
    import safetensors.torch
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    from .files import fsync_folder

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for path in sorted(source_dir.iterdir()):  # the HF tokenizer export_local_dir saved (none for BPE)
            if path.is_file() and path.name not in (HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
                shutil.copyfile(path, tmp / path.name)
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                    str(tmp / HF_SAFE_WEIGHTS_NAME))
        (tmp / HF_CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private
        fsync_folder(tmp)
        if out.exists():
            out.rmdir()  # empty (checked); rename cannot replace a folder on every platform
        os.rename(tmp, out)
        fsync_folder(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def build_skeleton(config: dict, small_cfg: dict):
    """The smaller model as open_clip builds its config (random weights): it says what every tensor's shape is."""
    import logging

    import open_clip
    from open_clip.constants import HF_CONFIG_NAME

    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / HF_CONFIG_NAME).write_text(json.dumps({**config, "model_cfg": small_cfg}))
        logging.disable(logging.WARNING)  # open_clip's "no weights in that folder": there are none, on purpose
        try:
            return open_clip.create_model(f"local-dir:{scratch}", load_weights=False, pretrained_text=False,
                                          pretrained_image=False)
        finally:
            logging.disable(logging.NOTSET)


def truncate(name: str, out: Path, dim: Optional[int] = None, image_layers: Optional[int] = None,
             text_layers: Optional[int] = None) -> dict:
    """Cut the export `name` (local-dir:PATH) into `out`; returns what was cut (plan(), plus "untrained")."""
    from open_clip.constants import HF_CONFIG_NAME

    from . import models
    from .checkpoint import read_nesting
    from .nesting import export_record, untrained, warn

    folder = source_folder(name)
    out = Path(out)
    check_out(out)
    config = json.loads((folder / HF_CONFIG_NAME).read_text())
    model = models.create(name)[0]
    cut = plan(model, config, dim, {IMAGE: image_layers, TEXT: text_layers})
    nesting = read_nesting(folder)
    missed = untrained(export_record(folder), cut["width"], [cut["dim"]], cut_depths(cut))
    warn(str(folder), export_record(folder), cut["width"], [cut["dim"]], cut_depths(cut))
    small_cfg = new_config(config, cut)
    skeleton = build_skeleton(config, small_cfg)
    tensors = sliced_state(model.state_dict(), skeleton.state_dict(), cut)
    skeleton.load_state_dict(tensors, strict=True)
    record = new_nesting(nesting, cut, missed)
    write_export(folder, {**{k: v for k, v in config.items() if k not in record and k != "truncated_from"},
                          "model_cfg": small_cfg, **record}, tensors, out)
    return {**cut, "untrained": missed, "bytes": (folder_bytes(folder), folder_bytes(out))}


def main(argv=None):
    args = parse_args(argv)
    done = truncate(args.model, Path(args.out), args.dim, args.image_layers, args.text_layers)
    depths = "".join(f", {tower} layers {depth} -> {l}" for tower, (l, depth, _) in done["layers"].items())
    before, after = done["bytes"]
    print(f"wrote {args.out}: embed_dim {done['width']} -> {done['dim']}{depths}; "
          f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.2f}x); "
          f"load it with open_clip.create_model_and_transforms('local-dir:{args.out}')")
    return 0


if __name__ == "__main__":
    not_a_command("truncate")
