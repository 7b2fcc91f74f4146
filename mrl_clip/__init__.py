"""Matryoshka (nested-dimension) CLIP on open_clip towers.

Importing the package registers its model configs with open_clip, so
`open_clip.create_model_and_transforms("ViT-B-32-768", pretrained="ckpt.pt")` works after `import mrl_clip`.
A config file may carry a "preprocess_cfg" (mean, std, interpolation: what its pretrained image tower was trained
with). open_clip's built-in configs have no such key (their preprocessing comes with a pretrained tag, or from the
"preprocess_cfg" beside "model_cfg" in an hf-hub:/local-dir: open_clip_config.json), and the model classes would
refuse it, so it moves out of open_clip's registry into PREPROCESS_CFGS; mrl_clip.models.create applies it and
exports write it into open_clip_config.json.
"""
from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PREPROCESS_CFGS: dict = {}


def split_preprocess_cfgs():
    """Move "preprocess_cfg" out of open_clip's config registry (again after any rescan; idempotent)."""
    for name, cfg in open_clip.factory._MODEL_CONFIGS.items():
        if "preprocess_cfg" in cfg:
            PREPROCESS_CFGS[name] = cfg.pop("preprocess_cfg")


if MODEL_CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
    open_clip.add_model_config(MODEL_CONFIG_DIR)
split_preprocess_cfgs()

__version__ = "0.1.0"
