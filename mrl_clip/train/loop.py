"""One optimizer step and one epoch of mrl_clip.train, the same for both engines.

An engine is what differs between plain PyTorch (DDP or one process) and DeepSpeed: how a forward is run, how a
loss is back-propagated, how the optimizer steps, and the checkpoint format (engine.Engine names the calls;
plain_engine.PlainEngine and deepspeed_engine.DeepSpeedEngine make them). Everything else — accumulation, the loss,
skipping non-finite steps, logging, the guards, when to checkpoint and validate, pre-emption — is written once,
here.
"""
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..errors import UserError
from . import epoch_checkpoints
from .agree import RankAgreement
from .engine import Engine, RunState
from .guards import BAD_FRACTION_MIN_SAMPLES, NonFiniteSteps, check_bad_fraction, log_bad_samples
from .position import StreamPosition, gather_positions
from .stream import StreamSettings, make_train_stream
from .tensorboard_log import write_train
from .validate import Validation, validate_if_due


@dataclass
class StepResult:
    loss: float
    per_dim: dict
    logit_scale: float  # exp(logit_scale) as the loss used it
    skipped: bool = False
    logit_bias: Optional[float] = None  # a model with one (SigLIP)


def all_ranks_finite(loss) -> bool:
    """Whether the loss is finite on every rank, so that all ranks skip a step together."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_step(engine: Engine, loss_fn, batches: list, autocast: Callable = nullcontext) -> StepResult:
    """One optimizer step over `batches` ([(images, texts)], --accum-freq of them). With several, open_clip's
    scheme: every batch's features are computed without gradients first, then each batch is re-encoded with
    gradients and the loss sees all batches' features, so the gradient is that of one batch of all their samples.
    Unlike open_clip, logit_scale's gradient (and a SigLIP model's logit_bias's) counts once, not accum_freq times:
    each pass gives 1/accum_freq of it.
    (Every pass still uses it: left out of a pass, it would be unused in the pass DDP synchronises, and ZeRO-3
    reduces a wrong gradient for it in a step whose first micro-batch left it out.) The loss runs in fp32 whatever
    the towers' precision. A non-finite loss skips the step on every rank before any backward; a non-finite
    gradient is the engine's to skip."""
    engine.zero_grad()
    if len(batches) > 1:
        with torch.no_grad(), autocast():
            cached = [[f.float() for f in engine(images, texts)[:2]] for images, texts in batches]
    for j, (images, texts) in enumerate(batches):
        with engine.no_sync(last=j == len(batches) - 1):
            with autocast():
                # (image, text, exp(logit_scale)), and logit_bias for a model with one
                image_features, text_features, *scalars = engine(images, texts)
                if len(batches) > 1:
                    # the same values, and 1/K of their gradients from each of the K passes
                    scalars = [s.detach() + (s - s.detach()) / len(batches) for s in scalars]
                    # along the batch: [B, D] features, or a 2D model's [exits, B, D] stacks
                    image_features = torch.cat([c[0] for c in cached[:j]] + [image_features.float()] +
                                               [c[0] for c in cached[j + 1:]], dim=-2)
                    text_features = torch.cat([c[1] for c in cached[:j]] + [text_features.float()] +
                                              [c[1] for c in cached[j + 1:]], dim=-2)
                total, per_dim = loss_fn(image_features.float(), text_features.float(), *[s.float() for s in scalars])
            if j == 0:
                values = [float(s.detach().float().reshape(-1)[0]) for s in scalars]
                result = StepResult(float(total.detach()), {m: float(v) for m, v in per_dim.items()}, values[0],
                                    logit_bias=values[1] if len(values) > 1 else None)
                if not all_ranks_finite(total):
                    result.skipped = True
                    return result
            engine.backward(total)
    result.skipped = not engine.step()
    return result


@dataclass
class Run:
    """What one training run carries from step to step (made by main.py)."""
    args: object                    # the parsed flags, with rank, world_size and device set
    engine: Engine                  # PlainEngine or DeepSpeedEngine
    loss_fn: Callable
    autocast: Callable
    schedule: Callable              # step -> lr (sets it on the optimizer)
    stream: StreamSettings          # the training data, each epoch's stream made from it
    tokenizer: Callable             # validation's
    steps_per_epoch: int
    total_steps: int
    run_dir: Path
    position: StreamPosition        # this rank's place in the data stream
    nonfinite: NonFiniteSteps
    agreement: RankAgreement        # pre-emption and bad-data totals, alike on every rank
    step: int = 0
    log_file: Optional[object] = None
    progress: Optional[object] = None
    val: Optional[Validation] = None  # --val-data
    writer: Optional[object] = None   # --report-to tensorboard: a SummaryWriter (rank 0)
    swap: Callable = nullcontext      # --feature-cache: the training forward reads the cached towers' features

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def last_checkpoint(self) -> Optional[Path]:
        return self.engine.last_checkpoint(self.checkpoint_dir)


def epoch_batches(run: Run, epoch: int, done_steps: int):
    """The loader of `epoch`, continued after `done_steps` of its optimizer steps (exactly where they stopped
    when the checkpoint holds this layout's stream position; else by batch count)."""
    position = run.position
    done_batches = done_steps * run.stream.accum_freq
    position.start_epoch(epoch)
    resumed = position.batches == done_batches > 0
    stream = make_train_stream(run.stream, epoch, skip_batches=done_batches,
                               consumed=position.consumed if resumed else None, bad=position.bad if resumed else None)
    position.batches = done_batches
    return iter(stream.loader)


def train_one_epoch(run: Run, epoch: int) -> bool:
    """The steps of `epoch` from run.step on. False when pre-empted (after saving a checkpoint)."""
    args = run.args
    start = run.step
    steps = min((epoch + 1) * run.steps_per_epoch, run.total_steps) - start
    batches = epoch_batches(run, epoch, start - epoch * run.steps_per_epoch)
    t_data = time.perf_counter()
    for _ in range(steps):
        group = list(islice(batches, args.accum_freq))
        if len(group) < args.accum_freq:
            break
        for _, _, report in group:
            log_bad_samples(run.position.update(report), run.step + 1, run.log_file)
        group = [(i.to(args.device, non_blocking=True), t.to(args.device, non_blocking=True)) for i, t, _ in group]
        lr = run.schedule(run.step)
        t_step = time.perf_counter()
        # a 2D loss draws the earlier exits it trains from the step (the same on every rank and resume)
        loss_fn = run.loss_fn.at_step(run.step) if hasattr(run.loss_fn, "at_step") else run.loss_fn
        # a distillation loss runs its teacher on the step's batches
        loss_fn = loss_fn.for_batches(group) if hasattr(loss_fn, "for_batches") else loss_fn
        with run.swap():
            result = train_step(run.engine, loss_fn, group, run.autocast)
        run.step += 1
        run.nonfinite.update(run.step, result.skipped)
        log_step(run, epoch, lr, result, t_data, t_step)
        if not after_step(run):
            return False
        t_data = time.perf_counter()
    if run.step == start:
        raise UserError(f"the shards yielded no usable sample (every image undecodable or without a caption?): "
                        f"{args.train_data}")
    return True


def after_step(run: Run) -> bool:
    """Pre-emption, the guards, validation and the periodic checkpoint. False when pre-empted."""
    agreed = run.agreement.exchange(run.position.bad_samples, run.position.samples_read)
    if agreed.preempted and run.step < run.total_steps:
        save(run)
        if run.args.rank == 0:
            print(f"pre-empted: checkpoint at step {run.step} of {run.total_steps}; resume with --resume latest",
                  file=sys.stderr)
        return False
    try:
        run.nonfinite.check(run.step, run.last_checkpoint)
        check_bad_fraction(agreed.bad_samples, agreed.samples_read, run.args.max_bad_fraction, run.step,
                           min(BAD_FRACTION_MIN_SAMPLES, run.args.train_num_samples), run.last_checkpoint)
    except UserError:
        if run.progress is not None:
            run.progress.close()
        raise
    validate_if_due(run)  # before the checkpoint: one taken at a step validated there already
    # not inside a run of skipped steps: the newest checkpoint stays one taken after a finite step
    saving = run.step % run.args.save_every_n_steps == 0 or epoch_checkpoints.due(run)
    if saving and run.step < run.total_steps and run.nonfinite.in_row == 0:
        save(run)
        epoch_checkpoints.write(run)
    return True


def run_state(run: Run) -> RunState:
    """The run's state at run.step: every rank's stream position (a collective under DDP), the skipped-step
    count and the last step validated."""
    args = run.args
    return RunState.of_args(args, run.step, epoch=run.step // run.steps_per_epoch,
                            data=gather_positions(run.position, args.distributed, args.world_size),
                            nonfinite=run.nonfinite.state_dict(),
                            validated_step=run.val.last_step if run.val is not None else None)


def save(run: Run) -> None:
    """A checkpoint at run.step: the engine's weights and optimizer, and the run's state (what an exact resume
    needs)."""
    run.engine.save_checkpoint(run.checkpoint_dir, run_state(run), run.args.keep_checkpoints)


def log_step(run: Run, epoch: int, lr: float, result: StepResult, t_data: float, t_step: float) -> None:
    if run.progress is not None:
        run.progress.update(1)
    if run.log_file is None or not (run.step % run.args.log_every_n_steps == 0 or run.step == run.total_steps):
        return
    now = time.perf_counter()
    step_samples = run.args.batch_size * run.args.accum_freq * run.args.world_size
    record = {"step": run.step, "epoch": epoch, "lr": lr, "loss": result.loss,
              "loss_dim": {str(m): v for m, v in result.per_dim.items() if isinstance(m, int)},
              **loss_layers(result.per_dim), "logit_scale": result.logit_scale,
              **({} if result.logit_bias is None else {"logit_bias": result.logit_bias}),
              "samples_per_s": step_samples / max(now - t_data, 1e-9), "step_s": now - t_step,
              "bad_samples": run.position.bad_samples, "samples_read": run.position.samples_read,
              "skipped_step": result.skipped, "skipped_steps": run.nonfinite.total}
    run.log_file.write(json.dumps(record) + "\n")
    run.log_file.flush()
    if run.writer is not None:
        write_train(run.writer, record)
    if run.progress is not None:
        run.progress.set_postfix_str(" ".join(f"{m}:{v:.3f}" for m, v in result.per_dim.items()
                                              if isinstance(m, int)))


def loss_layers(per_dim: dict) -> dict:
    """A 2D run's earlier exits' terms ({"loss_layer": {"text2_dim48": ..., "text2_kl": ...}}), {} otherwise."""
    exits = {m: v for m, v in per_dim.items() if not isinstance(m, int)}
    return {"loss_layer": exits} if exits else {}
