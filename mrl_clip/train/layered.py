"""2D Matryoshka training (--image-layers / --text-layers): the flags, the training forward that reads every
listed depth of a tower from one pass, and the loss over depths and dims (mrl_clip.loss.Matryoshka2dLoss).

The forward is instance-level and for training only, as locked_towers' swap is: DDP and DeepSpeed call the
model's forward and get [exits, B, D] stacks (normalised at full width, as open_clip's forward normalises), the
checkpoints and exports hold the plain open_clip model, and validation runs the full towers.
"""
import types

import torch.nn.functional as F

from ..errors import UserError
from ..layers import FLAGS, IMAGE, TEXT, check_layers, normalized_exits, parse_layers, tower_depth
from ..loss import LAYER_WEIGHTINGS, Matryoshka2dLoss

# sentence-transformers' Matryoshka2dLoss / AdaptiveLayerLoss defaults (n_layers_per_step=1 follows 2DMSE)
DEFAULTS = {"layers_per_step": 1, "last_layer_weight": 1.0, "prior_layers_weight": 1.0, "kl_div_weight": 1.0,
            "kl_temperature": 0.3, "layer_weighting": "uniform"}


def add_flags(p) -> None:
    p.add_argument("--image-layers", default=None,
                   help="2D Matryoshka: nested depths of a transformer image tower, strictly increasing, ending at "
                        "its depth (e.g. 4,8,12); the loss adds each earlier exit's Matryoshka loss")
    p.add_argument("--text-layers", default=None,
                   help="2D Matryoshka: nested depths of the text tower (e.g. 2,4,6; open_clip's or a Hugging "
                        "Face tower); with --image-layers too, as many as it, exit k of each paired")
    p.add_argument("--layers-per-step", type=int, default=DEFAULTS["layers_per_step"],
                   help="earlier exits trained per step, drawn at random (seeded by --seed and the step); -1: all "
                        "(sentence-transformers' n_layers_per_step; default 1, as 2DMSE)")
    p.add_argument("--last-layer-weight", type=float, default=DEFAULTS["last_layer_weight"],
                   help="weight of the full depth's loss (default 1)")
    p.add_argument("--prior-layers-weight", type=float, default=DEFAULTS["prior_layers_weight"],
                   help="weight of the earlier exits' losses, averaged over those drawn (default 1)")
    p.add_argument("--kl-div-weight", type=float, default=DEFAULTS["kl_div_weight"],
                   help="weight of the KL term pulling an earlier exit's embedding towards the full depth's "
                        "(default 1)")
    p.add_argument("--kl-temperature", type=float, default=DEFAULTS["kl_temperature"],
                   help="temperature of that KL term; 0 turns it off (default 0.3)")
    p.add_argument("--layer-weighting", choices=LAYER_WEIGHTINGS, default=DEFAULTS["layer_weighting"],
                   help="weight of an earlier exit by its depth i: uniform, log 1/(1+ln(1+i)), linear 1/(1+i) "
                        "(default uniform)")


def check_flags(args) -> None:
    args.image_layers = parse_layers(args.image_layers, FLAGS[IMAGE])
    args.text_layers = parse_layers(args.text_layers, FLAGS[TEXT])
    layered = args.image_layers or args.text_layers
    changed = [f"--{k.replace('_', '-')}" for k, v in DEFAULTS.items() if getattr(args, k) != v]
    if changed and not layered:
        raise UserError(f"{', '.join(changed)} only apply with --image-layers / --text-layers")
    if args.layers_per_step == 0 or args.layers_per_step < -1:
        raise UserError(f"--layers-per-step must be -1 (all) or at least 1, got {args.layers_per_step}")
    for flag in ("last_layer_weight", "prior_layers_weight", "kl_div_weight", "kl_temperature"):
        if not getattr(args, flag) >= 0:  # NaN fails too
            raise UserError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if args.image_layers and args.text_layers and len(args.image_layers) != len(args.text_layers):
        raise UserError(f"--image-layers {args.image_layers} and --text-layers {args.text_layers} pair exit k of one "
                        "with exit k of the other: list as many of each")


def layered_towers(args) -> dict:
    return {tower: layers for tower, layers in ((IMAGE, args.image_layers), (TEXT, args.text_layers)) if layers}


def check_model(model, args) -> None:
    """Each listed depth against its tower (a CNN image tower is refused in one line), after the --lock-* flags:
    a tower with nothing left to train (locked with its projection) would train nothing at any exit."""
    for tower, layers in layered_towers(args).items():
        check_layers(layers, tower_depth(model, tower), FLAGS[tower])
        if not any(p.requires_grad for p in tower_parameters(model, tower)):
            raise UserError(f"{FLAGS[tower]}: the {tower} tower is locked with its projection, so no exit of it "
                            "trains anything (unlock some of it, or leave out the flag)")


def tower_parameters(model, tower: str) -> list:
    if tower == IMAGE:
        return list(model.visual.parameters())
    if getattr(model, "text", None) is not None:
        return list(model.text.parameters())
    return [p for n, p in model.named_parameters() if not n.startswith("visual.") and n not in
            ("logit_scale", "logit_bias")]  # CLIP's built-in text tower lives on the model itself


def install_forward(model, args, cached: set) -> None:
    """The model's training forward returns each layered tower's exits ([exits, B, D]); a tower in `cached` (an HF
    text trunk cached at every exit, see locked_towers) reads them from its swapped forward."""
    towers = layered_towers(args)

    def features(tower, inputs):
        if tower in cached and tower in towers:  # the swapped tower gives [exits, B, D] from the cached trunk
            return F.normalize(model.encode_text(inputs), dim=-1)
        return normalized_exits(model, tower, inputs, towers.get(tower))

    def forward(self, image, text):
        out = (features(IMAGE, image), features(TEXT, text), self.logit_scale.exp())
        return out + (self.logit_bias,) if self.logit_bias is not None else out

    model.forward = types.MethodType(forward, model)


def make_loss(args, loss) -> Matryoshka2dLoss:
    return Matryoshka2dLoss(loss, layered_towers(args), args.layers_per_step, args.last_layer_weight,
                            args.prior_layers_weight, args.kl_div_weight, args.kl_temperature, args.layer_weighting,
                            seed=args.seed)


def record(args) -> dict:
    """What a checkpoint records of the 2D settings (a resume must agree)."""
    if not layered_towers(args):
        return {}
    return {"image_layers": args.image_layers, "text_layers": args.text_layers,
            **{k: getattr(args, k) for k in DEFAULTS}}

