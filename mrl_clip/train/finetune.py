"""open_clip's fine-tuning flags for mrl_clip.train: --pretrained-image, --lock-image*, --lock-text*,
--grad-checkpointing, with open_clip_train's meaning (its params.py and main.py), built on open_clip's own
lock_image_tower / lock_text_tower / set_grad_checkpointing.

Where open_clip fails with an assert or silently does something else, the same input is a one-line error here
(one case, BERT, is made to work):
- a count of unlocked groups/layers at or above what the tower has unlocks the whole tower (open_clip clamps or
  slices without a word; on a timm tower with --lock-image-freeze-bn-stats it then freezes every BatchNorm);
- --lock-text on open_clip's built-in text tower without --lock-text-freeze-layer-norm: open_clip asserts (its
  LayerNorms are locked like the other weights and cannot stay trainable), although open_clip_train's default for
  that flag is off;
- --lock-text-unlocked-layers on a BERT Hugging Face tower: open_clip has no layer names for BERT and raises a
  KeyError; it gets RoBERTa's (name_bert_layers), so open_clip's own lock() runs;
- --lock-image-* / --lock-text-* options without --lock-image / --lock-text: open_clip_train ignores them; a run
  that trains the whole tower when its user meant to lock it is a wasted run, so it is an error, not a warning.
"""
import torch

from ..errors import UserError

IMAGE_OPTIONS = ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats")
TEXT_OPTIONS = ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm")


def add_flags(p) -> None:
    p.add_argument("--pretrained-image", action="store_true",
                   help="timm image towers: start from the timm model's default (ImageNet) weights, unless "
                        "--pretrained loads a whole model")
    p.add_argument("--lock-image", action="store_true", help="lock the image tower (LiT): no gradients")
    p.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                   help="with --lock-image: leave the last N layer groups of the image tower trainable")
    p.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                   help="with --lock-image: freeze the BatchNorm running statistics of the locked groups")
    p.add_argument("--lock-text", action="store_true", help="lock the text tower: no gradients")
    p.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                   help="with --lock-text: leave the last N layer groups of the text tower trainable")
    p.add_argument("--lock-text-freeze-layer-norm", action="store_true",
                   help="with --lock-text: lock the LayerNorms of the locked layers too (needed by open_clip's "
                        "built-in text tower, which always locks them; a Hugging Face tower keeps them trainable "
                        "without it)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, more compute)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(args) -> None:
    """Mistakes visible from the flags alone."""
    for main_flag, options in (("lock_image", IMAGE_OPTIONS), ("lock_text", TEXT_OPTIONS)):
        given = [flag(o) for o in options if getattr(args, o)]
        if given and not getattr(args, main_flag):
            raise UserError(f"{' and '.join(given)} only apply with {flag(main_flag)} (open_clip would ignore "
                            f"{'them' if len(given) > 1 else 'it'} and train the whole tower)")
    for option in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        if getattr(args, option) < 0:
            raise UserError(f"{flag(option)} must be 0 or more, got {getattr(args, option)}")


def lock_record(args) -> str:
    """The lock flags as a string, kept in checkpoints: a resume must lock the same parameters (its optimizer state
    holds the trainable ones only)."""
    return " ".join(f"{flag(name)} {value}" if not isinstance(value, bool) else flag(name)
                    for name in ("lock_image", *IMAGE_OPTIONS, "lock_text", *TEXT_OPTIONS)
                    if (value := getattr(args, name)))


def image_groups(visual) -> int:
    """How many layer groups open_clip's lock(unlocked_groups=N) counts N in, for the image tower."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if visual.proj is None:
            raise UserError("--lock-image-unlocked-groups: open_clip cannot leave groups of a VisionTransformer "
                            "without a projection unlocked (its lock() expects one)")
        # the stem, each block but the last, the last block with ln_post, the projection
        return len(visual.transformer.resblocks) + 2
    if isinstance(visual, TimmModel):
        from timm.models import group_parameters

        # timm's group_matcher groups (the stem, the blocks, the final conv); the projection head is never locked
        return max(group_parameters(visual.trunk, visual.trunk.group_matcher())) + 1
    raise UserError(f"--lock-image-unlocked-groups: open_clip can only lock this {type(visual).__name__} image "
                    "tower whole (drop --lock-image-unlocked-groups)")


def text_groups(model) -> int:
    """How many layer groups open_clip's lock_text_tower(unlocked_layers=N) counts N in."""
    from open_clip.hf_model import HFTextEncoder, arch_dict

    text = getattr(model, "text", model)
    if isinstance(text, HFTextEncoder):
        name_bert_layers()
        names = arch_dict.get(text.config.model_type, {}).get("config_names", {})
        if "layer_attr" not in names or "token_embeddings_attr" not in names:
            raise UserError(f"--lock-text-unlocked-layers: open_clip can only lock this {text.config.model_type} "
                            "text tower whole (drop --lock-text-unlocked-layers)")
        encoder = getattr(text.transformer, "encoder", text.transformer)
        return len(getattr(encoder, names["layer_attr"])) + 1  # the embeddings, then each layer
    # open_clip's built-in tower: the embeddings, each block but the last, the last block with ln_final, the
    # projection (when there is one)
    return len(text.transformer.resblocks) + 1 + (getattr(text, "text_projection", None) is not None)


def name_bert_layers() -> None:
    """open_clip's table of Hugging Face architectures gives BERT (all-MiniLM-L6-v2's family) no layer names, so its
    HFTextEncoder.lock(unlocked_layers=N) raises a KeyError on a BERT tower. BertModel is laid out as RoBERTa is
    (`embeddings`, `encoder.layer`), so RoBERTa's names; an open_clip that names them itself keeps its own."""
    from open_clip.hf_model import arch_dict

    names = arch_dict.get("bert", {}).get("config_names")
    if names is not None:
        names.setdefault("layer_attr", "layer")
        names.setdefault("token_embeddings_attr", "embeddings")


def check_count(option: str, value: int, groups: int, tower: str) -> None:
    if value >= groups:
        raise UserError(f"{flag(option)} {value}: the {tower} tower has {groups} groups, so at most {groups - 1} "
                        f"can stay unlocked ({groups} would unlock it all: drop --lock-{tower} instead)")


def lock_image(model, args) -> None:
    visual = model.visual
    if not hasattr(visual, "lock"):
        raise UserError(f"--lock-image: open_clip cannot lock the image tower of {args.model} "
                        f"({type(visual).__name__} has no lock())")
    if args.lock_image_unlocked_groups:
        check_count("lock_image_unlocked_groups", args.lock_image_unlocked_groups, image_groups(visual), "image")
    from open_clip.timm_model import TimmModel

    timm_tower = isinstance(visual, TimmModel)
    model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                           freeze_bn_stats=args.lock_image_freeze_bn_stats and not timm_tower)
    if args.lock_image_freeze_bn_stats and timm_tower:
        freeze_timm_batch_norm(visual.trunk, args.lock_image_unlocked_groups)


def freeze_timm_batch_norm(trunk, unlocked_groups: int) -> None:
    """open_clip's freeze_bn_stats on a timm trunk, done with timm's own freeze_batch_norm_2d. open_clip's turns
    timm's BatchNormAct2d (batch norm + activation, as in every EfficientNet) into a plain FrozenBatchNorm2d and so
    drops the activation: the locked tower's features become garbage (|x| ~ 1e14 on tf_efficientnet_lite0). timm's
    keeps it (FrozenBatchNormAct2d). Same modules as open_clip: all of them, or those of the locked groups."""
    from timm.layers import freeze_batch_norm_2d
    from timm.models import group_modules

    chosen = None
    if unlocked_groups:
        groups = group_modules(trunk, trunk.group_matcher(), reverse=True)
        last_locked = max(groups.values()) - unlocked_groups
        chosen = {name for name, group in groups.items() if group <= last_locked}
    for name, module in list(trunk.named_modules()):
        if isinstance(module, torch.nn.BatchNorm2d) and (chosen is None or name in chosen):
            parent, _, leaf = name.rpartition(".")
            setattr(trunk.get_submodule(parent) if parent else trunk, leaf, freeze_batch_norm_2d(module))


def lock_text(model, args) -> None:
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", model)
    hf = isinstance(text, HFTextEncoder)
    if not hasattr(model, "lock_text_tower") or (text is not model and not hasattr(text, "lock")):
        raise UserError(f"--lock-text: open_clip cannot lock the text tower of {args.model} "
                        f"({type(text).__name__})")
    if not hf and not args.lock_text_freeze_layer_norm:
        raise UserError(f"--lock-text on {args.model}'s built-in text tower needs --lock-text-freeze-layer-norm: "
                        "open_clip locks its LayerNorms with the other weights and cannot leave them trainable")
    if args.lock_text_unlocked_layers:
        check_count("lock_text_unlocked_layers", args.lock_text_unlocked_layers, text_groups(model), "text")
    model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers,
                          freeze_layer_norm=args.lock_text_freeze_layer_norm)


def apply(model, args) -> None:
    """open_clip_train's order: lock the towers, then gradient checkpointing; before the optimizer is made, so it
    holds no state for a locked parameter, and before a resume, so the checkpoint's optimizer state fits."""
    if args.lock_image:
        lock_image(model, args)
    if args.lock_text:
        lock_text(model, args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()


def check_pretrained_image(args) -> None:
    """--pretrained-image needs a timm image tower and no whole-model --pretrained: open_clip ignores it otherwise."""
    if not args.pretrained_image:
        return
    from .. import models

    if "timm_model_name" not in models.model_config(args.model).get("vision_cfg", {}):
        raise UserError(f"--pretrained-image: {args.model}'s image tower is not a timm model, so there are no "
                        "ImageNet weights for it (open_clip would ignore the flag)")
    if args.pretrained or models.local_dir(args.model) is not None:
        raise UserError("--pretrained-image with whole-model weights (--pretrained or a local-dir: model): those "
                        "replace the image tower's (open_clip would ignore --pretrained-image)")
