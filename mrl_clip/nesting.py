"""Which dims (and depths) a model was trained to nest, and the one warning line for asking it for others.

The record is what a training run writes (mrl_clip.checkpoint.nesting_record): `matryoshka_dimensions`, the key
jina-clip-v2's Hugging Face config uses, and for a 2D run `matryoshka_layers` {"image": [...], "text": [...]}. It
is read from a `local-dir:` export's open_clip_config.json, from a training checkpoint (its "dims" and "layers"),
from a Matryoshka adaptor (its dims: the adapted prefixes are what it trained), or from an embeddings / index file
`mrl_clip embed` wrote (meta "nesting", the record of the model it embedded with).

The rule, for every verb that takes dims or depths (eval, embed, search, truncate): any dim up to the width is
allowed; the full width and the full depth never warn; otherwise, once per model and command, one line on stderr:
(a) a record that does not list the dim: "was not trained at dim 48 (trained: 8,16,...)", untrained dims
interpolate (the MRL paper measured it); (b) a record of the full width only (a standard model trained by
mrl_clip): its prefixes were never trained; (c) no record (a pretrained open_clip name, a model without a
checkpoint, an export from before exports recorded it or from another tool): the same, not trained by mrl_clip.
"""
import json
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

DIMS, LAYERS = "matryoshka_dimensions", "matryoshka_layers"


def listed(values) -> str:
    return ",".join(map(str, values))


def export_record(folder: Path) -> dict:
    """The record of a local-dir: export ({} when it has none). A truncate of a model without a record recorded
    only its new width: that is no more known than before, so it reads as none."""
    from open_clip.constants import HF_CONFIG_NAME

    path = Path(folder) / HF_CONFIG_NAME
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("truncated_from", {}).get("nesting") == {}:
        return {}
    return {k: config[k] for k in (DIMS, LAYERS) if k in config}


def checkpoint_record(path) -> dict:
    """The record of a training checkpoint (RunState's "dims" and "layers"), {} for another trainer's, or for a
    file that does not load (models.create says why, in one line)."""
    import torch

    from .checkpoint import nesting_record

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    if not isinstance(checkpoint, dict) or not checkpoint.get("dims"):
        return {}
    layers = checkpoint.get("layers") or {}
    return nesting_record([int(m) for m in checkpoint["dims"]], layers.get("image_layers"), layers.get("text_layers"))


def of_model(name: str, pretrained: Optional[str] = None, adaptor: Optional[str] = None) -> Optional[dict]:
    """The record of a model as the verbs name it (--model, --pretrained, --adaptor): {} when it has none; None
    when an adaptor file does not load (the verb fails on it in one line, so nothing is said here)."""
    from .models import local_dir

    if adaptor is not None:
        from .adaptor import load_adaptor
        from .errors import UserError

        try:
            return {DIMS: list(load_adaptor(adaptor).dims)}
        except UserError:
            return None
    if local_dir(name) is not None:
        return export_record(local_dir(name))
    if pretrained and Path(pretrained).is_file():
        return checkpoint_record(pretrained)
    return {}  # an open_clip pretrained tag, or a model with no weights of ours


def config_depth(cfg: dict, tower: str) -> Optional[int]:
    """A tower's full depth as its model config sets it (a transformer's `layers`, open_clip's default when
    unset; a Hugging Face text tower's hub config), None for a tower without layers (a timm CNN)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    sub = cfg.get("vision_cfg" if tower == "image" else "text_cfg") or {}
    if sub.get("timm_model_name"):
        return None
    if sub.get("hf_model_name"):
        from transformers import AutoConfig

        try:
            return int(AutoConfig.from_pretrained(sub["hf_model_name"]).num_hidden_layers)
        except (OSError, ValueError, AttributeError):
            return None
    layers = sub.get("layers", (CLIPVisionCfg if tower == "image" else CLIPTextCfg)().layers)
    return layers if isinstance(layers, int) else None


def untrained(record: dict, width: int, dims: Sequence[int],
              depths: Optional[Mapping[str, tuple]] = None) -> list:
    """What is asked for that `record` does not list as trained, ["dim 48 (trained: 8,16,256)", "image depth 3
    (trained: 2,4)"]; the full width and depth never. `depths` {tower: (asked depths, the tower's full depth or
    None when unknown)}. Without a record, only the full width and depth count as trained."""
    out = []
    trained = list(record.get(DIMS) or [width])
    missed = [m for m in dict.fromkeys(dims) if m != width and m not in trained]
    if missed:
        out.append(f"dim{'s' if len(missed) > 1 else ''} {listed(missed)} (trained: {listed(trained)})")
    for tower, (asked, full) in (depths or {}).items():
        trained = list((record.get(LAYERS) or {}).get(tower) or ([full] if full else []))
        missed = [l for l in dict.fromkeys(asked or []) if l != full and l not in trained]
        if missed:
            out.append(f"{tower} depth{'s' if len(missed) > 1 else ''} {listed(missed)} "
                       f"(trained: {listed(trained) or 'the full depth only'})")
    return out


def warning(who: str, record: Optional[dict], width: int, dims: Sequence[int],
            depths: Optional[Mapping[str, tuple]] = None) -> Optional[str]:
    """The one warning line for asking `who` (a model as the user named it) for `dims` and `depths`; None when all
    were trained, or the record is unknown (None)."""
    if record is None:
        return None
    missed = untrained(record, width, dims, depths)
    if not missed:
        return None
    what = "; ".join(missed)
    dims_missed = any(m.startswith("dim") for m in missed)
    kinds = " and ".join(kind for kind, on in (("prefixes", dims_missed),
                                               ("shallower exits", not all(m.startswith("dim") for m in missed)))
                         if on)
    if not record:
        return (f"warning: {who} records no Matryoshka nesting (not trained by mrl_clip, or exported before exports "
                f"recorded it): its {kinds} were never trained ({what}); what they score is what slicing an "
                "ordinary model gives")
    if list(record.get(DIMS) or []) == [width] and not record.get(LAYERS):
        return (f"warning: {who} was trained without Matryoshka nesting ({DIMS} [{width}]): its {kinds} were "
                f"never trained ({what})")
    return (f"warning: {who} was not trained at {what}: untrained dims between trained ones interpolate (the MRL "
            "paper measured it), others are only as good as they happen to be")


def warn(who: str, record: Optional[dict], width: int, dims: Sequence[int],
         depths: Optional[Mapping[str, tuple]] = None, said: Optional[set] = None) -> Optional[str]:
    """Print warning() on stderr, once per command: `said` holds the lines already printed."""
    line = warning(who, record, width, dims, depths)
    if line and (said is None or line not in said):
        print(line, file=sys.stderr)
        if said is not None:
            said.add(line)
    return line
