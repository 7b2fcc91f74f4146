"""DeepSpeed checkpoints of mrl_clip.train as open_clip checkpoints and `local-dir:` exports.

    python -m mrl_clip convert-deepspeed RUN/checkpoints/deepspeed --out exported/      # the latest step
    python -m mrl_clip convert-deepspeed RUN/checkpoints/deepspeed --tag step_2000 --out exported/

writes OUT/step_N.pt (open_clip.create_model_and_transforms(MODEL, pretrained=...) loads it) and OUT/export/
(`local-dir:OUT/export`, no mrl_clip needed). Works for any ZeRO stage and any number of ranks that wrote it.

A run's DeepSpeed checkpoints are folders RUN/checkpoints/deepspeed/step_N (every rank writes its part; `latest`
names the newest complete one). Their fp32 weights are rebuilt with DeepSpeed's `zero_to_fp32` tool, which reads
every rank's optimizer state: the trainer does it at the end of a run (DeepSpeedEngine.export_model), this command
for any step kept.
"""
import argparse
import os
import re
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from .. import models
from ..checkpoint import export_local_dir, step_checkpoints
from ..errors import ArgumentParser, UserError, not_a_command
from ..files import atomic_torch_save
from .engine import RunState

TAG_PREFIX = "step_"
STEP_TAG = re.compile(r"^step_(\d+)$")
SCALARS = ("logit_scale", "logit_bias")  # open_clip's 0-dim parameters, trained as [1] by the engine


def open_clip_state_dict(state_dict: dict) -> dict:
    """Engine weights → open_clip's layout: 0-dim logit_scale (and logit_bias), fp32, on the CPU."""
    out = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in state_dict.items()}
    for name in SCALARS:
        if name in out:
            out[name] = out[name].reshape(())
    return out


def step_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def latest_tag(ds_dir: Path):
    pointer = Path(ds_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (Path(ds_dir) / tag).is_dir() else None


def step_tags(ds_dir: Path) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in step_checkpoints(ds_dir, STEP_TAG) if path.is_dir()]


def client_state(ds_dir: Path, tag: str) -> RunState:
    """What mrl_clip.train stored beside the weights (its RunState), read without pickle."""
    folder = Path(ds_dir) / tag
    # ZeRO-1/2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_R_mp_rank_00_model_states.pt per rank
    candidates = [folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UserError(f"not a DeepSpeed checkpoint folder (no mp_rank_00_model_states.pt): {folder}")
    return RunState.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def open_clip_checkpoint(ds_dir: Path, tag: str) -> dict:
    """An open_clip checkpoint (fp32 weights, no optimizer) from a DeepSpeed checkpoint of mrl_clip.train."""
    return {**client_state(ds_dir, tag).to_dict(resume=False), "state_dict": fp32_state_dict(ds_dir, tag),
            "deepspeed": tag}


def write_open_clip_checkpoint(ds_dir: Path, tag: str, path: Path) -> tuple[dict, object]:
    """(checkpoint, model): open_clip_checkpoint of `tag` written atomically to `path`, and the open_clip model it
    names, holding those weights."""
    checkpoint = open_clip_checkpoint(ds_dir, tag)
    if checkpoint["model"] is None:
        raise UserError(f"{Path(ds_dir) / tag} was not written by mrl_clip.train (no model name in it)")
    atomic_torch_save(checkpoint, path)
    model = models.create(checkpoint["model"], siglip=bool(checkpoint["siglip"]))[0]
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint, model


def fp32_state_dict(ds_dir: Path, tag: str) -> dict:
    """open_clip's fp32 state dict rebuilt from a DeepSpeed checkpoint folder (any ZeRO stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with quiet_stdout():
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    return open_clip_state_dict(state_dict)


@contextmanager
def quiet_stdout():
    """zero_to_fp32 prints its progress on every save; errors still raise."""
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), redirect_stderr(devnull):
        yield


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
    tag = args.tag or latest_tag(ds_dir)
    if tag is None:
        raise UserError(f"{ds_dir} has no complete checkpoint ('latest' missing); pass --tag step_N")
    if not (ds_dir / tag).is_dir():
        raise UserError(f"no checkpoint {tag} in {ds_dir} (found: "
                        f"{', '.join(p.name for _, p in step_tags(ds_dir)) or 'none'})")
    out = Path(args.out)
    checkpoint_path = out / f"{tag}.pt"
    checkpoint, model = write_open_clip_checkpoint(ds_dir, tag, checkpoint_path)
    export_local_dir(model, models.training_config(checkpoint["model"], bool(checkpoint["siglip"])),
                     out / "export")
    print(f"{checkpoint_path} (open_clip checkpoint of {checkpoint['model']}, step {checkpoint.get('step')}); "
          f"local-dir:{out / 'export'}")
    return 0


if __name__ == "__main__":
    not_a_command("convert-deepspeed")
