"""Creating open_clip models by name, with user mistakes turned into one-line errors."""
import json
import os
import pickle
from pathlib import Path
from typing import Optional

import open_clip

from . import MODEL_CONFIG_DIR  # noqa: F401  (registers our model configs)
from .checkpoint import refused_pickle
from .errors import UserError

LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model folder (open_clip_config.json + weights)


def local_dir(name: str) -> Optional[Path]:
    """The folder of a `local-dir:PATH` model name; None for any other name."""
    return Path(name[len(LOCAL_DIR):]) if name.startswith(LOCAL_DIR) else None


def model_config(name: str) -> dict:
    if local_dir(name) is not None:
        config_path = local_dir(name) / "open_clip_config.json"
        if not config_path.is_file():
            raise UserError(f"{name}: no open_clip_config.json in that folder")
        return json.loads(config_path.read_text())["model_cfg"]
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        ours = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise UserError(f"unknown model {name!r} (mrl_clip adds {', '.join(ours)}; "
                        "see open_clip.list_models() for the rest, or use local-dir:PATH)")
    return cfg


def embed_width(name: str) -> int:
    return int(model_config(name)["embed_dim"])


def create(name: str, pretrained: Optional[str] = None, device: str = "cpu", precision: str = "fp32"):
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip name, `local-dir:PATH`, or a name
    plus a checkpoint file."""
    model_config(name)  # unknown names fail here with a clear message
    if pretrained and local_dir(name) is None:
        if not os.path.isfile(pretrained) and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise UserError(f"checkpoint not found: {pretrained}")
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision)
    except pickle.UnpicklingError:  # open_clip loads with weights_only=True
        raise UserError(refused_pickle(pretrained)) from None
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:300]
        if "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err):
            raise UserError(f"checkpoint {pretrained} does not fit model {name}: {first}") from None
        raise
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer
