"""Fully locked towers: which part of a locked tower is a fixed function of its input (its "trunk"), pinning that
part in eval mode (--deterministic-towers), and, for --feature-cache, running the rest of the model on the trunk's
stored output instead of the trunk.

What the trunk is, per tower type (what open_clip's lock_image_tower / lock_text_tower lock):
- open_clip TimmModel (image): `trunk`, locked with 0 unlocked groups; its `head` (pooling, projection) trains.
  Fully locked needs --lock-image-freeze-bn-stats too: else BatchNorm uses batch statistics and updates its running
  ones, and a sample's features depend on its batch.
- open_clip HFTextEncoder (text): `transformer` and `pooler`, locked with 0 unlocked layers and
  --lock-text-freeze-layer-norm (without it open_clip leaves the LayerNorms trainable); `proj` trains. With
  --text-layers (2D) the trunk's output is the pooled output at every listed depth, side by side.
- open_clip VisionTransformer (image), locked with 0 unlocked groups: the whole tower, projection included.
- open_clip's built-in text tower (CLIP's encode_text), locked with --lock-text-freeze-layer-norm and 0 unlocked
  layers: the whole tower, projection included.
Anything else is refused in one line for --feature-cache / --deterministic-towers to act on.

The swap is instance-level and only for the training forward (`swapped`): DDP and DeepSpeed see the model's own
forward, the checkpoints and exports hold the real weights, and validation runs the real towers.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..layers import hf_pooled_exits

IMAGE, TEXT = "image", "text"


@dataclass
class Trunk:
    """The fully locked part of one tower."""
    tower: str                   # IMAGE or TEXT
    kind: str                    # "timm-trunk", "hf-pooled", "vit", "clip-text"
    modules: list                # the locked modules (pinned in eval mode; their weights are the cache's digest)
    encode: Callable             # input batch (images or tokens) -> the trunk's output, as the training forward has it


def image_trunk(model, args) -> Optional[Trunk]:
    """The image tower's fully locked trunk; None when --lock-image is not given. One line when it is locked but
    not fully."""
    if not args.lock_image:
        return None
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if args.lock_image_unlocked_groups:
        raise UserError(f"--lock-image-unlocked-groups {args.lock_image_unlocked_groups}: the image tower is not "
                        "fully locked, so its features are not a fixed function of the image (use 0 for "
                        "--feature-cache / --deterministic-towers)")
    if isinstance(visual, TimmModel):
        if not args.lock_image_freeze_bn_stats:
            raise UserError("the timm image tower is not fully locked without --lock-image-freeze-bn-stats (its "
                            "BatchNorm uses each batch's statistics): add it for --feature-cache / "
                            "--deterministic-towers")
        return Trunk(IMAGE, "timm-trunk", [visual.trunk], visual.trunk)
    if isinstance(visual, VisionTransformer):
        return Trunk(IMAGE, "vit", [visual], visual)
    raise UserError(f"--feature-cache / --deterministic-towers: {type(visual).__name__} image towers are not "
                    "supported (timm and open_clip VisionTransformer towers are)")


def text_trunk(model, args) -> Optional[Trunk]:
    """The text tower's fully locked trunk; None when --lock-text is not given."""
    if not args.lock_text:
        return None
    from open_clip.hf_model import HFTextEncoder

    if args.lock_text_unlocked_layers:
        raise UserError(f"--lock-text-unlocked-layers {args.lock_text_unlocked_layers}: the text tower is not fully "
                        "locked (use 0 for --feature-cache / --deterministic-towers)")
    if not args.lock_text_freeze_layer_norm:
        raise UserError("the text tower is not fully locked without --lock-text-freeze-layer-norm (open_clip leaves "
                        "its LayerNorms trainable): add it for --feature-cache / --deterministic-towers")
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        if text.output_tokens:
            raise UserError("--feature-cache: Hugging Face text towers with output_tokens are not supported")

        layers = getattr(args, "text_layers", None)
        if layers:  # 2D: the pooled output at every exit, side by side ([B, exits x width])
            return Trunk(TEXT, "hf-pooled-layers" + ".".join(map(str, layers)), [text.transformer, text.pooler],
                         lambda tokens: torch.cat(hf_pooled_exits(text, tokens, layers), dim=-1))

        def pooled(tokens):
            mask = (tokens != text.config.pad_token_id).long()
            return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)
        return Trunk(TEXT, "hf-pooled", [text.transformer, text.pooler], pooled)
    if text is None and hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        parts = [getattr(model, n) for n in ("token_embedding", "transformer", "ln_final")]
        return Trunk(TEXT, "clip-text", parts, model.encode_text)
    raise UserError(f"--feature-cache / --deterministic-towers: {type(text).__name__} text towers are not supported "
                    "(Hugging Face and open_clip's built-in text towers are)")


def fully_locked(model, args, strict: bool = True) -> tuple[list[Trunk], list[str]]:
    """(the model's fully locked trunks, image first; why each other locked tower is not one). `strict`: a locked
    tower that is not fully locked is one line (UserError) instead. Checked: every parameter in a trunk is
    locked."""
    trunks, refused = [], []
    for find in (image_trunk, text_trunk):
        try:
            trunk = find(model, args)
        except UserError as err:
            if strict:
                raise
            refused.append(str(err))
            continue
        if trunk is not None:
            trunks.append(trunk)
    for trunk in trunks:
        trainable = [n for m in trunk.modules for n, p in m.named_parameters() if p.requires_grad]
        if trainable or (trunk.kind == "clip-text" and getattr(model, "text_projection", None) is not None
                         and _trainable(model.text_projection)):
            raise UserError(f"the {trunk.tower} tower is not fully locked ({(trainable or ['text_projection'])[0]} "
                            "trains)")
    return trunks, refused


def _trainable(p) -> bool:
    if isinstance(p, torch.nn.Module):
        return any(q.requires_grad for q in p.parameters())
    return p.requires_grad


def pin_eval(trunks: list[Trunk]) -> None:
    """The trunks stay in eval mode (no dropout, no drop-path, no BatchNorm statistics) whatever model.train() the
    trainer, DDP or DeepSpeed calls: their `train` is made a no-op that keeps eval mode."""
    for trunk in trunks:
        for module in trunk.modules:
            module.eval()
            for sub in module.modules():
                sub.train = _pinned_train.__get__(sub)


def _pinned_train(self, mode: bool = True):
    torch.nn.Module.train(self, False)
    return self


@contextmanager
def swapped(model, trunks: list[Trunk]):
    """Within: the model's forward takes each cached tower's trunk output in place of its input (images or
    tokens), and runs the rest of that tower (a timm head, an HF projection, or nothing)."""
    patched = []
    try:
        for trunk in trunks:
            target, name, replacement = _replacement(model, trunk)
            setattr(target, name, replacement)
            patched.append((target, name))
        yield
    finally:
        for target, name in patched:
            delattr(target, name)  # the instance attribute: the class's method shows through again


def _replacement(model, trunk: Trunk):
    if trunk.kind == "timm-trunk":
        return model.visual.trunk, "forward", _identity
    if trunk.kind == "vit":
        return model.visual, "forward", _identity
    if trunk.kind == "hf-pooled":
        proj = model.text.proj
        return model.text, "forward", lambda features: proj(features)  # a function: a Module would be registered
    if trunk.kind.startswith("hf-pooled-layers"):  # [B, exits x width] -> [exits, B, embed_dim]
        proj, width = model.text.proj, model.text.config.hidden_size
        # one exit at a time, as the uncached forward projects them (the same kernels: the same bits)
        return model.text, "forward", lambda features: torch.stack([proj(f) for f in features.split(width, dim=-1)])
    return model, "encode_text", _encode_cached_text


def _identity(x):
    return x


def _encode_cached_text(features, normalize: bool = False):
    return F.normalize(features, dim=-1) if normalize else features
