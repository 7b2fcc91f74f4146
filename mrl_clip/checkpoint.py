"""Checkpoints in open_clip's format, written atomically, and `local-dir:` exports plain open_clip loads."""
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .files import atomic_write

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_checkpoints(folder: Path, pattern: re.Pattern = STEP_FILE) -> list[tuple[int, Path]]:
    """(step, path) of the entries of `folder` whose name matches `pattern` (its group 1 is the step), oldest
    first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := pattern.match(name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = step_checkpoints(folder)
    return found[-1][1] if found else None


def newest_loadable_checkpoint(folder: Path) -> Optional[tuple[Path, dict]]:
    """(path, checkpoint) of the newest step checkpoint that loads; a newer one that does not (a disk fault:
    atomic saves never leave one) is passed over with a warning naming it."""
    for _, path in reversed(step_checkpoints(folder)):
        try:
            return path, load_checkpoint_file(path)
        except UserError as err:
            print(f"warning: passing over {path}: {err}", file=sys.stderr)
    return None


def prune_checkpoints(folder: Path, keep: int, pattern: re.Pattern = STEP_FILE, spare: Optional[Path] = None):
    """Remove all but the newest `keep` checkpoints (files or folders) of `folder`, never `spare`."""
    if keep <= 0:
        return
    for _, path in step_checkpoints(folder, pattern)[:-keep]:
        if path == spare:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def refused_pickle(path) -> str:
    return (f"refused to load {path}: it holds pickled objects other than tensors and plain containers, which "
            "could run code (loads use torch.load(weights_only=True))")


def load_checkpoint_file(path: Path) -> dict:
    """weights_only load (no pickled code runs); a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(refused_pickle(path)) from None
    except Exception as err:
        raise UserError(f"cannot load checkpoint {path}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not an open_clip training checkpoint (no 'state_dict')")
    return checkpoint


def export_local_dir(model, model_cfg: dict, folder: Path, nesting: Optional[dict] = None) -> Path:
    """open_clip_config.json + open_clip_model.safetensors: `create_model_and_transforms('local-dir:FOLDER')`
    loads it with plain open_clip (no mrl_clip import needed). open_clip's save_for_hf also saves an HF tokenizer,
    which the built-in BPE tokenizer lacks, so we call its config writer and write the weights ourselves; a
    Hugging Face text tower's tokenizer is saved too (open_clip's get_tokenizer('local-dir:FOLDER') reads it from the
    folder), while its model config resolves by hub name, so the folder holds no path of this machine. The config,
    written last, is what makes the folder loadable. `nesting` (nesting_record) goes into that config beside
    open_clip's keys, which open_clip ignores: the dims (and depths) the model was trained to nest."""
    import safetensors.torch
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf

    folder = Path(folder)
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        save_hf_tokenizer(model_cfg["text_cfg"]["hf_tokenizer_name"], folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / HF_SAFE_WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    def write_config(tmp):
        save_config_for_hf(model, Path(tmp), model_config=model_cfg)
        if nesting:
            config = json.loads(Path(tmp).read_text())
            Path(tmp).write_text(json.dumps({**config, **nesting}, indent=2))
    atomic_write(folder / HF_CONFIG_NAME, write_config)
    return folder


def nesting_record(dims, image_layers=None, text_layers=None) -> dict:
    """What an export says it was trained to nest: `matryoshka_dimensions` (the key jina-clip-v2's Hugging Face
    config uses) and, for a 2D model, `matryoshka_layers` {"image": [...], "text": [...]}."""
    record = {"matryoshka_dimensions": list(dims)}
    layers = {tower: list(depths) for tower, depths in (("image", image_layers), ("text", text_layers)) if depths}
    if layers:
        record["matryoshka_layers"] = layers
    return record


def read_nesting(folder: Path) -> dict:
    """The nesting record of a local-dir: export ({} for one written before exports recorded it, or by another
    tool)."""
    from open_clip.constants import HF_CONFIG_NAME

    config = json.loads((Path(folder) / HF_CONFIG_NAME).read_text())
    return {k: config[k] for k in ("matryoshka_dimensions", "matryoshka_layers") if k in config}


def save_hf_tokenizer(name: str, folder: Path):
    """The tokenizer files as transformers' save_pretrained writes them (what open_clip's save_for_hf writes)."""
    import tempfile

    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer-") as tmp:
        AutoTokenizer.from_pretrained(name).save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            atomic_write(folder / path.name, lambda out, path=path: shutil.copyfile(path, out))
