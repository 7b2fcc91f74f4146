"""Every flag of open_clip_train's trainer (open_clip_train/params.py), and what mrl_clip.train does with it:
supported with open_clip's meaning, supported differently (the line says how and why), or refused (one line and
exit 2, naming what to use instead). docs/open_clip_flags.md is rendered from FLAGS (write_docs), and
tests/test_open_clip_flags.py reads open_clip_train's own parser, so a flag a new open_clip adds is caught there.
"""
import argparse
import sys
from pathlib import Path

from ..errors import UserError

SUPPORTED = "supported"      # open_clip's meaning, type, nargs and choices
DIFFERENT = "different"      # accepted, with the difference given
REFUSED = "refused"          # one line and exit 2

STATUS_TEXT = {SUPPORTED: "supported (open_clip's meaning)", DIFFERENT: "supported differently",
               REFUSED: "refused"}

EVAL = "python -m mrl_clip eval zeroshot --model local-dir:RUN/export"

# flag -> (status, one line); open_clip_train's order
FLAGS = {
    "--train-data": (DIFFERENT, "WebDataset shards only (brace expansion, '::' between sources); a CSV file with "
                                "--dataset-type csv"),
    "--train-data-upsampling-factors": (SUPPORTED, ""),
    "--val-data": (DIFFERENT, "a CLIP_benchmark folder (zero-shot classification or retrieval), measured at every "
                              "--dims, rather than open_clip's image-text pairs whose contrastive loss it reports"),
    "--train-num-samples": (SUPPORTED, "default: sizes.json beside the shards"),
    "--val-num-samples": (REFUSED, "validation reads the whole --val-data folder: make a smaller CLIP_benchmark "
                                   "folder to validate on fewer samples"),
    "--dataset-type": (SUPPORTED, ""),
    "--dataset-resampled": (SUPPORTED, ""),
    "--csv-separator": (SUPPORTED, ""),
    "--csv-img-key": (SUPPORTED, ""),
    "--csv-caption-key": (SUPPORTED, ""),
    "--imagenet-val": (REFUSED, f"no ImageNet evaluation inside training: run {EVAL} --dataset imagenet1k "
                                "--dataset-root IMAGENET_DIR after training, or pass a CLIP_benchmark folder as "
                                "--val-data"),
    "--imagenet-v2": (REFUSED, f"no ImageNet evaluation inside training: run {EVAL} --dataset imagenetv2 "
                               "--dataset-root IMAGENETV2_DIR after training, or pass a CLIP_benchmark folder as "
                               "--val-data"),
    "--cache-dir": (REFUSED, "pretrained weights come from the Hugging Face cache: set HF_HOME (or HF_HUB_CACHE) "
                             "instead"),
    "--logs": (SUPPORTED, "also spelled --output-dir (torchrun's --logs-specs makes a bare --logs ambiguous); "
                          "default runs"),
    "--log-local": (SUPPORTED, "RUN/out.log from rank 0, or RUN/out-RANK from each node's local rank 0: a copy "
                               "of the process's stderr lines, appended on resume (open_clip refuses an existing "
                               "one unless --resume latest); RUN/log.jsonl stays the machine-readable log"),
    "--name": (SUPPORTED, "default: the model and dims rather than a date"),
    "--workers": (SUPPORTED, "default 1"),
    "--batch-size": (SUPPORTED, "default 128"),
    "--epochs": (SUPPORTED, "default 1"),
    "--epochs-cooldown": (SUPPORTED, ""),
    "--lr": (SUPPORTED, "default 5e-4 for every model"),
    "--beta1": (SUPPORTED, "default 0.9"),
    "--beta2": (SUPPORTED, "default 0.98 for every model"),
    "--eps": (SUPPORTED, "default 1e-6 for every model"),
    "--wd": (SUPPORTED, ""),
    "--momentum": (REFUSED, "open_clip uses it for timm optimizers only, which mrl_clip.train does not offer "
                            "(AdamW): drop it"),
    "--warmup": (SUPPORTED, "default 100"),
    "--opt": (DIFFERENT, "'adamw' only (open_clip's default); timm optimizers are refused"),
    "--use-bn-sync": (REFUSED, "BatchNorm statistics stay per rank: freeze them with --lock-image "
                               "--lock-image-freeze-bn-stats, or train without SyncBatchNorm"),
    "--skip-scheduler": (SUPPORTED, ""),
    "--lr-scheduler": (SUPPORTED, ""),
    "--lr-cooldown-end": (SUPPORTED, ""),
    "--lr-cooldown-power": (SUPPORTED, ""),
    "--save-frequency": (DIFFERENT, "epoch_N.pt as open_clip writes them, but off unless given (step_N.pt "
                                    "checkpoints already cover resume): --save-frequency 1 is open_clip's default"),
    "--save-most-recent": (SUPPORTED, "epoch_latest.pt at every epoch end; --resume latest reads the newest "
                                      "step_N.pt, never older than it"),
    "--zeroshot-frequency": (REFUSED, "no ImageNet zero-shot inside training: pass a CLIP_benchmark folder as "
                                      "--val-data with --val-frequency N (or --val-every-n-steps N)"),
    "--val-frequency": (DIFFERENT, "with --val-data, every N epochs and after the last step; 0 turns it off"),
    "--resume": (DIFFERENT, "'latest' or a checkpoint file, as open_clip; with --deepspeed a DeepSpeed folder "
                            "RUN/checkpoints/deepspeed/step_N; a resume continues at the step it saved"),
    "--precision": (DIFFERENT, "fp32 (our default), amp, amp_bf16, amp_bfloat16; for bf16/fp16 weights use "
                               "--deepspeed with a bf16 or fp16 config"),
    "--model": (SUPPORTED, "required (no RN50 default)"),
    "--pretrained": (SUPPORTED, "a checkpoint file or a pretrained tag of --model"),
    "--pretrained-image": (SUPPORTED, ""),
    "--lock-image": (SUPPORTED, ""),
    "--lock-image-unlocked-groups": (SUPPORTED, "too large a count is an error, not a silent unlock"),
    "--lock-image-freeze-bn-stats": (SUPPORTED, "timm towers keep their activations (timm's freeze_batch_norm_2d)"),
    "--image-mean": (SUPPORTED, ""),
    "--image-std": (SUPPORTED, ""),
    "--image-interpolation": (SUPPORTED, ""),
    "--image-resize-mode": (SUPPORTED, ""),
    "--aug-cfg": (SUPPORTED, ""),
    "--grad-checkpointing": (SUPPORTED, ""),
    "--local-loss": (SUPPORTED, ""),
    "--gather-with-grad": (SUPPORTED, ""),
    "--force-context-length": (SUPPORTED, ""),
    "--force-image-size": (SUPPORTED, ""),
    "--force-quick-gelu": (REFUSED, "write a model config with \"quick_gelu\": true (mrl_clip/model_configs) "
                                    "and pass its name as --model"),
    "--force-patch-dropout": (SUPPORTED, ""),
    "--force-custom-text": (REFUSED, "write a model config with \"custom_text\": true (mrl_clip/model_configs) "
                                     "and pass its name as --model"),
    "--torchscript": (REFUSED, "training does not script the model: export RUN/export and script it yourself, "
                               "or use --torchcompile"),
    "--torchcompile": (SUPPORTED, ""),
    "--trace": (REFUSED, "open_clip's --trace is for inference only: export RUN/export and trace it yourself"),
    "--accum-freq": (SUPPORTED, "logit_scale's gradient counts once, not accum-freq times"),
    "--device": (SUPPORTED, "default cuda when there is one, else cpu"),
    "--dist-url": (SUPPORTED, ""),
    "--dist-backend": (SUPPORTED, ""),
    "--report-to": (SUPPORTED, "tensorboard, wandb or all (both)"),
    "--wandb-notes": (SUPPORTED, ""),
    "--wandb-project-name": (SUPPORTED, ""),
    "--debug": (REFUSED, "no debug logging mode: log every step with --log-every-n-steps 1 (RUN/log.jsonl)"),
    "--copy-codebase": (REFUSED, "record the code with git (the commit) and RUN/params.json rather than a copy "
                                 "of the tree"),
    "--horovod": (REFUSED, "Horovod is not supported: launch with torchrun or srun (DDP), or --deepspeed"),
    "--ddp-static-graph": (REFUSED, "DDP is built with its defaults: drop the flag (or use --deepspeed)"),
    "--no-set-device-rank": (REFUSED, "each rank takes cuda:LOCAL_RANK: restrict the GPUs a rank sees with "
                                      "CUDA_VISIBLE_DEVICES instead"),
    "--seed": (SUPPORTED, ""),
    "--grad-clip-norm": (SUPPORTED, ""),
    "--lock-text": (SUPPORTED, "open_clip's built-in text tower needs --lock-text-freeze-layer-norm"),
    "--lock-text-unlocked-layers": (SUPPORTED, "too large a count is an error, not a silent unlock"),
    "--lock-text-freeze-layer-norm": (SUPPORTED, ""),
    "--log-every-n-steps": (SUPPORTED, "default 10"),
    "--coca-caption-loss-weight": (REFUSED, "CoCa is not trained here (Matryoshka CLIP/SigLIP losses only): use "
                                            "open_clip_train for CoCa"),
    "--coca-contrastive-loss-weight": (REFUSED, "CoCa is not trained here (Matryoshka CLIP/SigLIP losses only): "
                                                "use open_clip_train for CoCa"),
    "--remote-sync": (DIFFERENT, "LOGS/NAME copied to REMOTE/NAME with open_clip_train's remote_sync; --resume "
                                 "latest reads the local folder (copy the remote run back first)"),
    "--remote-sync-frequency": (SUPPORTED, "seconds between syncs, in a background process"),
    "--remote-sync-protocol": (SUPPORTED, "s3 shells out to `aws s3 sync` as open_clip does; fsspec copies "
                                          "changed files"),
    "--delete-previous-checkpoint": (DIFFERENT, "removes the previous epoch_N.pt once a newer one is written "
                                                "(open_clip removes epoch_{N-1}.pt at every epoch end, which with "
                                                "--save-frequency above 1 leaves none)"),
    "--distill-model": (SUPPORTED, ""),
    "--distill-pretrained": (SUPPORTED, ""),
    "--use-bnb-linear": (REFUSED, "no int8 (bitsandbytes) training: train in fp32 or amp, or with --deepspeed "
                                  "and a bf16 config"),
    "--siglip": (SUPPORTED, "every prefix gets open_clip's SigLipLoss"),
    "--loss-dist-impl": (SUPPORTED, "with --siglip"),
}


class Refused(argparse.Action):
    """An open_clip flag mrl_clip.train does not honour: one line naming what to use instead."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.pop("nargs", None)
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{option_string} (open_clip_train's flag) is not supported by mrl_clip.train: "
                        f"{FLAGS[option_string][1]}")


def add_flags(p) -> None:
    """Register every refused flag, so that it fails with its line rather than argparse's 'unrecognized'."""
    for flag, (status, _) in FLAGS.items():
        if status == REFUSED:
            p.add_argument(flag, action=Refused)


def captured_parser(parse_args, argv):
    """The ArgumentParser that `parse_args(argv)` builds inside itself (open_clip_train's params.parse_args, or
    ours): read from its frame as it returns, through sys.setprofile, so nothing is patched. `argv` must parse."""
    found = {}

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is parse_args.__code__:
            found["parser"] = next(v for v in frame.f_locals.values() if isinstance(v, argparse.ArgumentParser))

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        parse_args(argv)
    finally:
        sys.setprofile(previous)
    return found["parser"]


def open_clip_parser():
    from open_clip_train.params import parse_args

    return captured_parser(parse_args, [])


def render() -> str:
    lines = ["# open_clip_train's flags in mrl_clip.train", "",
             "Every flag of open_clip_train's trainer (`open_clip_train/params.py`, open_clip 3.3.0) and what "
             "`python -m mrl_clip.train` does with it. Generated from `mrl_clip/train/open_clip_flags.py` "
             "(`write_docs()`); `tests/test_open_clip_flags.py` checks it against open_clip_train's own parser and "
             "ours. A refused flag is one line and exit 2, naming what to use instead. Flags of ours that open_clip "
             "lacks (`--dims`, `--save-every-n-steps`, `--deepspeed`, ...) are in `python -m mrl_clip.train --help` "
             "and docs/training.md.", "",
             "| flag | status | note |", "|---|---|---|"]
    for flag, (status, note) in FLAGS.items():
        lines.append(f"| `{flag}` | {STATUS_TEXT[status]} | {note.replace('|', '/')} |")
    counts = {s: sum(1 for v, _ in FLAGS.values() if v == s) for s in STATUS_TEXT}
    lines += ["", ", ".join(f"{n} {STATUS_TEXT[s]}" for s, n in counts.items()) + f" ({len(FLAGS)} flags).", ""]
    return "\n".join(lines)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "open_clip_flags.md"


def write_docs(path: Path = DOCS) -> None:
    from ..files import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(render()))
