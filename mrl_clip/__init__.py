"""Matryoshka (nested-dimension) CLIP on open_clip towers.

Importing the package registers its model configs with open_clip, so
`open_clip.create_model_and_transforms("ViT-B-32-768", pretrained="ckpt.pt")` works after `import mrl_clip`.
Our configs with a timm image tower are normalised as timm's pretrained_cfg of that tower says (mrl_clip.models.create;
exports carry it in open_clip_config.json's "preprocess_cfg").
"""
from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

if MODEL_CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
    open_clip.add_model_config(MODEL_CONFIG_DIR)

__version__ = "0.1.0"
