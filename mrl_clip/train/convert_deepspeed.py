"""Turn a DeepSpeed checkpoint of mrl_clip.train into an open_clip checkpoint and a `local-dir:` export.

    python -m mrl_clip convert-deepspeed RUN/checkpoints/deepspeed --out exported/      # the latest step
    python -m mrl_clip convert-deepspeed RUN/checkpoints/deepspeed --tag step_2000 --out exported/

writes OUT/step_N.pt (open_clip.create_model_and_transforms(MODEL, pretrained=...) loads it) and OUT/export/
(`local-dir:OUT/export`, no mrl_clip needed). Works for any ZeRO stage and any number of ranks that wrote it.
"""
import argparse
from pathlib import Path

from .. import models
from ..checkpoint import export_local_dir
from ..errors import ArgumentParser, UserError
from . import deepspeed_engine


def main(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip convert-deepspeed", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ds_dir", help="a run's checkpoints/deepspeed folder")
    p.add_argument("--tag", default=None, help="step_N (default: the one 'latest' points at)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)

    ds_dir = Path(args.ds_dir)
    if not ds_dir.is_dir():
        raise UserError(f"DeepSpeed checkpoint folder not found: {ds_dir}")
    tag = args.tag or deepspeed_engine.latest_tag(ds_dir)
    if tag is None:
        raise UserError(f"{ds_dir} has no complete checkpoint ('latest' missing); pass --tag step_N")
    if not (ds_dir / tag).is_dir():
        raise UserError(f"no checkpoint {tag} in {ds_dir} (found: "
                        f"{', '.join(p.name for _, p in deepspeed_engine.step_tags(ds_dir)) or 'none'})")
    out = Path(args.out)
    checkpoint_path = out / f"{tag}.pt"
    checkpoint, model = deepspeed_engine.write_open_clip_checkpoint(ds_dir, tag, checkpoint_path)
    export_local_dir(model, models.training_config(checkpoint["model"], checkpoint.get("siglip", False)),
                     out / "export")
    print(f"{checkpoint_path} (open_clip checkpoint of {checkpoint['model']}, step {checkpoint.get('step')}); "
          f"local-dir:{out / 'export'}")
    return 0

