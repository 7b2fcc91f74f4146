"""--image-layer-decay / --text-layer-decay: layer-wise learning-rate decay (BEiT's, timm's param_groups_layer_decay),
per tower, with open_clip's meaning.

The installed open_clip_train (3.3.0) has no such flags; open_clip's main branch adds them (open_clip_train/
optimizer.py, layer_decay_param_groups): each tower is cut into ordered groups, input to output (`embeddings`,
`layer.{i}` with the tower's final norm in the last block's group, `proj` the projection head), and group i of n
gets lr_scale = decay ** (n - 1 - i): the head 1.0, each group nearer the input one factor smaller. Everything
outside a decayed tower (logit_scale, an undecayed tower) keeps 1.0; weight decay splits as without the flags
(timm's param_groups_weight_decay rule: none on 1-d parameters and biases). open_clip_train 3.3.0's cosine_lr sets
every group's lr to the schedule's value, dropping lr_scale, so `scheduled` multiplies it back in after each call.
"""
from typing import Optional

from ..errors import UserError

FLAGS = {"image": "--image-layer-decay", "text": "--text-layer-decay"}


def add_flags(p) -> None:
    p.add_argument("--image-layer-decay", type=float, default=None,
                   help="layer-wise lr decay of the image tower in (0, 1]: its projection head at --lr, each block "
                        "nearer the input this factor lower (open_clip main's flag; 1 or unset: off)")
    p.add_argument("--text-layer-decay", type=float, default=None,
                   help="the same for the text tower")


def check_flags(args) -> None:
    for tower, flag in FLAGS.items():
        value = getattr(args, f"{tower}_layer_decay")
        if value is not None and not 0 < value <= 1:  # NaN fails too
            raise UserError(f"{flag} must be in (0, 1], got {value}")
    if decays(args) and getattr(args, "skip_scheduler", False):
        raise UserError("--skip-scheduler with a layer decay: the decayed lrs are set by the schedule; use "
                        "--lr-scheduler const for a constant lr")


def decays(args) -> dict:
    return {t: getattr(args, f"{t}_layer_decay") for t in FLAGS if getattr(args, f"{t}_layer_decay") not in (None, 1)}


def _members(*things) -> list:
    return [t for t in things if t is not None]


def text_groups(model) -> list:
    """open_clip main's text layer_groups: [[members of embeddings], [layer 0], ..., [proj]]."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        hf = text.transformer
        encoder = getattr(hf, "encoder", hf)
        blocks = getattr(encoder, "layer", None)
        if blocks is None or getattr(hf, "embeddings", None) is None:
            raise UserError(f"{FLAGS['text']}: the Hugging Face text tower {type(hf).__name__} has no "
                            "embeddings / encoder.layer to group by depth")
        # the readout pooler (HF's and open_clip's) goes with the head, open_clip's pooler_in_head default
        return [[hf.embeddings], *[[b] for b in blocks], _members(getattr(hf, "pooler", None), text.pooler,
                                                                  text.proj)]
    tower = text if text is not None else model  # a standard CLIP unpacks its text tower onto the model
    if getattr(tower, "transformer", None) is None or not hasattr(tower.transformer, "resblocks"):
        raise UserError(f"{FLAGS['text']}: {type(text).__name__} text towers have no layers to decay")
    blocks = [[b] for b in tower.transformer.resblocks]
    blocks[-1].append(tower.ln_final)
    embeddings = _members(tower.token_embedding, tower.positional_embedding, getattr(tower, "cls_emb", None))
    return [embeddings, *blocks, _members(tower.text_projection)]


def image_groups(model) -> list:
    """open_clip main's image layer_groups: a VisionTransformer's embeddings, blocks (ln_post with the last) and
    head; a timm trunk's own group_matcher groups (timm's layer decay) and the adapter head."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if isinstance(visual, VisionTransformer):
        blocks = [[b] for b in visual.transformer.resblocks]
        blocks[-1].append(visual.ln_post)
        embeddings = _members(visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre)
        return [embeddings, *blocks, _members(visual.attn_pool, getattr(visual, "attn_pool_contrastive", None),
                                              visual.proj)]
    if isinstance(visual, TimmModel):
        from timm.models import group_parameters

        by_layer = group_parameters(visual.trunk, visual.trunk.group_matcher())
        groups = [[visual.trunk.get_parameter(n) for n in by_layer[i]] for i in sorted(by_layer)]
        return groups + ([[visual.head]] if any(True for _ in visual.head.parameters()) else [])
    raise UserError(f"{FLAGS['image']}: {type(visual).__name__} image towers have no layers to decay")


def lr_scales(model, args) -> dict:
    """{id(parameter): lr_scale} for the parameters of the decayed towers."""
    scales = {}
    for tower, decay in decays(args).items():
        groups = image_groups(model) if tower == "image" else text_groups(model)
        for i, members in enumerate(groups):
            for member in members:
                params = member.parameters() if hasattr(member, "parameters") else [member]
                for p in params:
                    scales[id(p)] = decay ** (len(groups) - 1 - i)
    return scales


def param_groups(model, args) -> Optional[list]:
    """AdamW param groups keyed by (lr_scale, weight decay or not), each with its "lr_scale"; None without the
    flags (the optimizer then takes timm's param_groups_weight_decay, as before)."""
    if not decays(args):
        return None
    scales = lr_scales(model, args)
    buckets = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(".bias")  # timm's param_groups_weight_decay rule
        scale = scales.get(id(p), 1.0)
        group = buckets.setdefault((scale, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else args.wd,
                                                    "lr_scale": scale})
        group["params"].append(p)
    return [buckets[k] for k in sorted(buckets, key=lambda k: (-k[0], k[1]))]


def scheduled(schedule, optimizer):
    """`schedule` (open_clip_train's cosine_lr: sets every group's lr), then each group's lr times its lr_scale."""
    def step(i: int) -> float:
        lr = schedule(i)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
    return step
