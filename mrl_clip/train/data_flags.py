"""open_clip_train's data and preprocessing flags, with its names, types and meanings (docs/training.md, "open_clip's
data and preprocessing flags"): the dataset type and its CSV columns, upsampling factors for '::'-joined sources,
and the transform and force_* overrides main.py hands to open_clip's create_model_and_transforms as open_clip_train's
main.py does."""
import argparse
import ast
import os

from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

from ..errors import UserError

DATASET_TYPES = ["webdataset", "csv", "synthetic", "auto"]


class ParseKwargs(argparse.Action):
    """open_clip_train.params.ParseKwargs (KEY=VALUE words, values read as Python literals, else strings), with a
    word without '=' a one-line error instead of a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for value in values:
            if value.count("=") != 1:
                raise UserError(f"{option_string} takes KEY=VALUE words, got {value!r}")
            key, value = value.split("=")
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = str(value)
        setattr(namespace, self.dest, kw)


def add_flags(p) -> None:
    p.add_argument("--train-data-upsampling-factors", type=str, default=None,
                   help="with '::'-joined --train-data sources and --dataset-resampled: one weight per source "
                        "('1::4'), each shard of a source drawn with its source's weight (open_clip's meaning)")
    p.add_argument("--dataset-type", choices=DATASET_TYPES, default="auto",
                   help="webdataset shards, or a csv of image paths and captions; auto: by the --train-data "
                        "extension (.csv/.tsv: csv, .tar: webdataset), as open_clip does. synthetic is refused")
    p.add_argument("--csv-separator", type=str, default="\t", help="csv: the column separator (default: tab)")
    p.add_argument("--csv-img-key", type=str, default="filepath", help="csv: the column of image paths")
    p.add_argument("--csv-caption-key", type=str, default="title", help="csv: the column of captions")
    p.add_argument("--image-mean", type=float, nargs="+", default=None, metavar="MEAN",
                   help="override the model's image mean")
    p.add_argument("--image-std", type=float, nargs="+", default=None, metavar="STD",
                   help="override the model's image std")
    p.add_argument("--image-interpolation", default=None, type=str, choices=["bicubic", "bilinear", "random"],
                   help="override the resize interpolation")
    p.add_argument("--image-resize-mode", default=None, type=str, choices=["shortest", "longest", "squash"],
                   help="override the resize (and crop) mode of the validation transform")
    p.add_argument("--aug-cfg", nargs="*", default={}, action=ParseKwargs,
                   help="training augmentation, open_clip's AugmentationCfg fields: scale='(0.8,1.0)' ...")
    p.add_argument("--force-context-length", type=int, default=None, help="override the text context length")
    p.add_argument("--force-image-size", type=int, nargs="+", default=None, help="override the image size")
    p.add_argument("--force-patch-dropout", default=None, type=float,
                   help="override the vision tower's patch dropout")


def resolve_dataset_type(train_data: str, dataset_type: str) -> str:
    """open_clip_train.data.get_dataset_fn's choice, with its failures as one line."""
    if dataset_type == "synthetic":
        raise UserError("--dataset-type synthetic is not supported by mrl_clip.train: use webdataset or csv")
    if dataset_type != "auto" or not train_data.strip():  # an empty list is the shard check's to name
        return dataset_type if dataset_type != "auto" else "webdataset"
    ext = train_data.split(".")[-1]
    if ext in ("csv", "tsv"):
        return "csv"
    if ext == "tar":
        return "webdataset"
    raise UserError(f"--dataset-type auto cannot tell the type of {train_data!r} from its extension {ext!r}: "
                    "pass --dataset-type webdataset or csv")


def check_flags(args) -> None:
    args.dataset_type = resolve_dataset_type(args.train_data, args.dataset_type)
    if args.train_data_upsampling_factors is not None:
        check_upsampling(args)
    if args.dataset_type == "csv" and not os.path.isfile(args.train_data):
        raise UserError(f"csv not found: {args.train_data}")
    if args.dataset_type == "csv" and args.feature_cache:
        raise UserError("--feature-cache reads webdataset shards: it cannot be used with --dataset-type csv")
    if args.aug_cfg and args.deterministic_towers:
        raise UserError("--aug-cfg has no effect with --deterministic-towers (it trains on the validation "
                        "transform, which has no augmentation): drop one")
    check_aug_cfg(args.aug_cfg)
    for flag in ("image_mean", "image_std"):
        values = getattr(args, flag)
        if values is not None and len(values) not in (1, 3):
            raise UserError(f"--{flag.replace('_', '-')} takes 1 or 3 values, got {len(values)}")
    if args.force_image_size is not None:
        if len(args.force_image_size) > 2 or min(args.force_image_size) < 1:
            raise UserError(f"--force-image-size takes one or two sizes above 0, got {args.force_image_size}")
        if len(args.force_image_size) == 1:  # open_clip_train/main.py: a single (square) size is an int
            args.force_image_size = args.force_image_size[0]
    if args.force_context_length is not None and args.force_context_length < 1:
        raise UserError(f"--force-context-length must be at least 1, got {args.force_context_length}")
    if args.force_patch_dropout is not None and not 0 <= args.force_patch_dropout < 1:
        raise UserError(f"--force-patch-dropout must be in [0, 1), got {args.force_patch_dropout}")


def check_aug_cfg(aug_cfg: dict) -> None:
    """An --aug-cfg open_clip's AugmentationCfg takes and its training transform builds (open_clip asserts on some
    combinations, e.g. color_jitter_prob without four color_jitter values)."""
    try:
        cfg = AugmentationCfg(**aug_cfg)
    except TypeError as err:
        raise UserError(f"--aug-cfg: {err} (fields: {', '.join(AugmentationCfg.__dataclass_fields__)})") from None
    try:
        image_transform_v2(PreprocessCfg(), is_train=True, aug_cfg=cfg)
    except Exception as err:
        raise UserError(f"--aug-cfg {aug_cfg}: open_clip cannot build its training transform "
                        f"({type(err).__name__}: {str(err)[:200] or 'assertion failed'})") from None


def check_upsampling(args) -> None:
    """open_clip's rules (an assert in get_wds_dataset, one in expand_urls), and weights it could not use."""
    if args.dataset_type != "webdataset":
        raise UserError("--train-data-upsampling-factors applies to webdataset sources only")
    if not args.dataset_resampled:
        raise UserError("--train-data-upsampling-factors is only supported when sampling with replacement "
                        "(with --dataset-resampled)")
    sources, factors = args.train_data.split("::"), args.train_data_upsampling_factors.split("::")
    if len(sources) != len(factors):
        raise UserError(f"--train-data-upsampling-factors has {len(factors)} factors for {len(sources)} "
                        "'::'-joined --train-data sources")
    try:
        weights = [float(f) for f in factors]
    except ValueError:
        raise UserError(f"--train-data-upsampling-factors takes numbers joined by '::', got "
                        f"{args.train_data_upsampling_factors!r}") from None
    if not all(w >= 0 for w in weights) or not any(w > 0 for w in weights) or any(w == float("inf") for w in weights):
        raise UserError(f"--train-data-upsampling-factors must be finite, 0 or more, and not all 0: "
                        f"{args.train_data_upsampling_factors}")


def model_kwargs(args) -> dict:
    """What open_clip_train/main.py passes create_model_and_transforms from these flags (None: the model's own)."""
    return {"force_patch_dropout": args.force_patch_dropout, "force_image_size": args.force_image_size,
            "force_context_length": args.force_context_length, "image_mean": args.image_mean,
            "image_std": args.image_std, "image_interpolation": args.image_interpolation,
            "image_resize_mode": args.image_resize_mode, "aug_cfg": args.aug_cfg}


def config_overrides(cfg: dict, args) -> dict:
    """The model config with the force_* overrides applied as open_clip's factory applies them: what the run's
    model is, so that its export (and the feature cache's key) builds that model."""
    vision, text = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    if getattr(args, "force_patch_dropout", None) is not None:
        vision["patch_dropout"] = args.force_patch_dropout
    if getattr(args, "force_image_size", None) is not None:
        vision["image_size"] = args.force_image_size
    if getattr(args, "force_context_length", None) is not None:
        text["context_length"] = args.force_context_length
    return {**cfg, "vision_cfg": vision, "text_cfg": text}
