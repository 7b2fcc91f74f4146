"""Per-dim validation during mrl_clip.train: --val-data, a CLIP_benchmark folder (zero-shot classification, or
retrieval when its dataset_type.txt says so), measured at every --dims on rank 0 by mrl_clip.eval's own functions.

When: every --val-every-n-steps steps; after every --val-frequency-th epoch and after the last step of the run
(open_clip's flag and meaning: epochs N, 2N, ... and the last; 0 turns this off). The other ranks wait at a
barrier. A validation leaves the training as it was: the model goes back to train mode, and torch's (CPU and CUDA),
Python's and numpy's RNG states are restored (a DataLoader draws its seed from torch's), so a run with --val-data
ends with the same weights as one without. A checkpoint records the last step validated; a run resumed at a step
whose validation the pre-emption cut off runs it first.
"""
import json
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import UserError
from ..eval.zeroshot import evaluate_zeroshot, load_classification_folder
from ..eval.zeroshot_retrieval import dataset_type, encode_pairs, load_retrieval_folder, retrieval_metrics

VAL_SPLIT = "test"
RECALL_K = (1, 5, 10)
HEADLINE = {"zeroshot": "acc1", "retrieval": "image_retrieval_recall@5"}  # the metric of the one-line summary


def add_flags(p) -> None:
    p.add_argument("--val-data", default=None, metavar="DIR",
                   help="a CLIP_benchmark folder (zero-shot classification, or retrieval by its dataset_type.txt) "
                        f"measured at every --dims during training, on its '{VAL_SPLIT}' split")
    p.add_argument("--val-frequency", type=int, default=1,
                   help="with --val-data: validate after every N-th epoch and after the last step (0: never "
                        "by epoch)")
    p.add_argument("--val-every-n-steps", type=int, default=None, help="with --val-data: also every N steps")


def check_flags(args) -> None:
    if args.val_frequency < 0:
        raise UserError(f"--val-frequency must be 0 or more, got {args.val_frequency}")
    if args.val_every_n_steps is not None and args.val_every_n_steps < 1:
        raise UserError("--val-every-n-steps must be at least 1")
    if args.val_data is not None:
        load_val_set(args.val_data)  # the folder's checks, before anything else starts


@dataclass
class ValSet:
    folder: str
    task: str      # "zeroshot" or "retrieval"
    data: object   # zeroshot.ClassificationSet, or CLIP_benchmark's retrieval dataset


def load_val_set(folder: str, transform=None) -> ValSet:
    """The folder read by mrl_clip.eval's loaders (CLIP_benchmark's reader)."""
    try:
        kind = dataset_type(folder)  # CLIP_benchmark's rule: no dataset_type.txt is a classification folder
        if kind == "retrieval":
            return ValSet(folder, "retrieval", load_retrieval_folder(folder, transform, VAL_SPLIT))
        if kind != "classification":
            raise UserError(f"{folder}: its dataset_type.txt says '{kind}'; validation takes zero-shot "
                            "classification or retrieval folders")
        return ValSet(folder, "zeroshot", load_classification_folder(folder, transform, VAL_SPLIT))
    except UserError as err:
        raise UserError(f"--val-data: {err}") from None


@dataclass
class ValSchedule:
    every_n_steps: Optional[int]
    epoch_frequency: int
    steps_per_epoch: int
    total_steps: int

    def due(self, step: int) -> bool:
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        if not self.epoch_frequency:
            return False
        epoch_end = step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % self.epoch_frequency == 0
        return epoch_end or step == self.total_steps


@dataclass
class Validation:
    """What a run needs to validate (Run.val; None without --val-data)."""
    val_set: ValSet
    schedule: ValSchedule
    dims: list
    last_step: Optional[int] = None  # the last step validated; checkpoints record it


@contextmanager
def preserved_rng():
    """torch's CPU and CUDA, Python's and numpy's RNG states as they were before."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def evaluate_dims(model, tokenizer, val_set: ValSet, dims: list, device, batch_size: int, workers: int) -> dict:
    """{dim: {metric: value}}: mrl_clip.eval's zero-shot or retrieval metrics of an in-memory model."""
    if val_set.task == "zeroshot":
        return evaluate_zeroshot(model, tokenizer, val_set.data, dims, device, batch_size, workers)
    model.eval()
    images, texts, index = encode_pairs(model, tokenizer, val_set.data, device, batch_size)
    return retrieval_metrics(images, texts, index, dims, RECALL_K)


def validate_if_due(run) -> None:
    if run.val is not None and run.val.schedule.due(run.step):
        validate(run)


def catch_up(run, validated_step: Optional[int]) -> None:
    """At a resume: the validation of the resumed step, if it was due and its run was pre-empted before it."""
    if run.val is None:
        return
    run.val.last_step = validated_step
    if run.step and run.val.schedule.due(run.step) and validated_step != run.step:
        validate(run)


def validate(run) -> None:
    """Rank 0 measures every dim of the current weights; the other ranks wait."""
    args = run.args
    if args.rank == 0:
        started = time.perf_counter()
        try:
            with preserved_rng(), run.autocast():
                metrics = evaluate_dims(run.engine.eval_model(), run.tokenizer, run.val.val_set, run.val.dims,
                                        args.device, args.batch_size, args.workers)
        finally:
            run.engine.train()
        report(run, metrics, time.perf_counter() - started)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    run.val.last_step = run.step


def report(run, metrics: dict, seconds: float) -> None:
    """A log.jsonl record, TensorBoard scalars val/{metric}_dim{m}, and one line on stderr."""
    val = run.val
    if run.log_file is not None:
        record = {"step": run.step, "epoch": (run.step - 1) // run.steps_per_epoch, "val_data": val.val_set.folder,
                  "val_task": val.val_set.task, "val_dim": {str(m): v for m, v in metrics.items()}, "val_s": seconds}
        run.log_file.write(json.dumps(record) + "\n")
        run.log_file.flush()
    if run.writer is not None:
        for m, values in metrics.items():
            for name, value in values.items():
                run.writer.add_scalar(f"val/{name}_dim{m}", value, run.step)
        run.writer.flush()
    name, small, full = HEADLINE[val.val_set.task], val.dims[0], val.dims[-1]
    tqdm.write(f"val at step {run.step} ({val.val_set.task}, {Path(val.val_set.folder).name}): {name} "
               f"{metrics[small][name]:.4f} at {small}-d, {metrics[full][name]:.4f} at {full}-d ({seconds:.1f} s)",
               file=sys.stderr)
