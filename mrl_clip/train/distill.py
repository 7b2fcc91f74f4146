"""--distill-model / --distill-pretrained: a Matryoshka student distilled from a frozen teacher, open_clip_train's
distillation at every prefix (mrl_clip.loss.MatryoshkaDistillLoss).

As in open_clip_train, the teacher is an open_clip model (a name and a pretrained tag or checkpoint file, or our
local-dir: export), in eval mode, run without gradients on the student's own images and tokens: it must read the
same input, so a teacher whose image size, normalisation or tokens differ is refused in one line (open_clip_train
assumes they agree and does not check). It sits outside the engine (DDP or DeepSpeed: it trains nothing) and its
features for a step are computed once over all its --accum-freq batches, in batch order, as the student's are
concatenated (open_clip_train refuses accumulation with distillation; the concatenation makes it the same loss).
"""
import functools

import torch
from open_clip_train.precision import get_autocast

from .. import models
from ..errors import UserError
from ..loss import MatryoshkaDistillLoss

PROBE_TEXTS = ["a photo of a dog", "an example caption, longer than the others, to see where it is cut: " * 4]


def add_flags(p) -> None:
    p.add_argument("--distill-model", default=None,
                   help="distil from this teacher (open_clip model name or local-dir:PATH), frozen; every prefix "
                        "of the student is trained against its full-width logits (open_clip's DistillClipLoss)")
    p.add_argument("--distill-pretrained", default=None,
                   help="the teacher's weights: a pretrained tag of --distill-model or a checkpoint file")


def check_flags(args) -> None:
    if not args.distill_model:
        if args.distill_pretrained:
            raise UserError("--distill-pretrained needs --distill-model")
        return
    models.model_config(args.distill_model)  # an unknown name fails here, before the run starts
    if args.distill_pretrained is None and models.local_dir(args.distill_model) is None:
        # open_clip_train distils only when both are given; a random teacher is never what was meant
        raise UserError("--distill-model needs --distill-pretrained (a tag or checkpoint file), unless it is a "
                        "local-dir: export")
    if args.siglip:
        # open_clip_train's create_loss picks DistillClipLoss over SigLipLoss and then fails on the logit_bias
        raise UserError("--distill-model is not supported with --siglip (open_clip_train distils with the CLIP "
                        "softmax loss only)")
    if getattr(args, "feature_cache", None):
        raise UserError("--distill-model is not supported with --feature-cache (the teacher needs the images and "
                        "texts the cache replaces)")
    if getattr(args, "image_layers", None) or getattr(args, "text_layers", None):
        raise UserError("--distill-model is not supported with --image-layers / --text-layers")


def enabled(args) -> bool:
    return bool(args.distill_model)


def make_teacher(args, device, student, tokenizer):
    """The frozen teacher on `device`, after checking it reads the student's input."""
    with torch.random.fork_rng():  # its random initialisation (before its weights load) leaves the run's RNG be
        teacher, _, _, teacher_tokenizer = models.create(args.distill_model, args.distill_pretrained,
                                                         device=str(device))
    check_same_input(student, tokenizer, teacher, teacher_tokenizer, args.distill_model)
    teacher.requires_grad_(False)
    return teacher.eval()


def check_same_input(student, tokenizer, teacher, teacher_tokenizer, name: str) -> None:
    mine, theirs = student.visual.preprocess_cfg, teacher.visual.preprocess_cfg
    for key in ("size", "mean", "std"):
        if tuple(mine[key]) != tuple(theirs[key]):
            raise UserError(f"--distill-model {name} reads images of {key} {tuple(theirs[key])}, the student "
                            f"{tuple(mine[key])}: the teacher sees the student's images, so they must agree")
    a, b = tokenizer(PROBE_TEXTS), teacher_tokenizer(PROBE_TEXTS)
    if a.shape != b.shape or not torch.equal(a, b):
        raise UserError(f"--distill-model {name} tokenizes text otherwise than the student (tokenizer or context "
                        "length): the teacher sees the student's tokens, so they must agree")


class Distillation:
    """The step's loss: for_batches(batches) runs the teacher on the step's batches and returns the loss the loop
    calls as loss_fn(image_features, text_features, logit_scale)."""

    def __init__(self, teacher, loss: MatryoshkaDistillLoss, autocast):
        self.teacher, self.loss, self.autocast = teacher, loss, autocast

    def teacher_features(self, batches) -> tuple:
        with torch.no_grad(), self.autocast():
            outs = [self.teacher(images, texts) for images, texts in batches]
        image = torch.cat([o[0].float() for o in outs])
        text = torch.cat([o[1].float() for o in outs])
        return image, text, outs[0][2].float()

    def for_batches(self, batches):
        return functools.partial(self.student_loss, *self.teacher_features(batches))

    def student_loss(self, dist_image, dist_text, dist_logit_scale, image_features, text_features, logit_scale):
        return self.loss(image_features, text_features, logit_scale, dist_image, dist_text, dist_logit_scale)


def make_loss(args, teacher) -> Distillation:
    loss = MatryoshkaDistillLoss(args.dims, args.dim_weights, local_loss=args.local_loss,
                                 gather_with_grad=args.gather_with_grad, rank=args.rank, world_size=args.world_size)
    return Distillation(teacher, loss, get_autocast(args.precision, device_type=torch.device(args.device).type))
