"""Matryoshka CLIP training on WebDataset shards (one process, or torchrun / srun with DDP or DeepSpeed).

    python -m mrl_clip.train --model MRL-Tiny-28 --train-data 'shards/train-{0000..0009}.tar' \
        --dims 8,16,32,64,128,256 --batch-size 128 --epochs 1 --logs runs --name mrl
    ... --deepspeed configs/ds_zero2_bf16.json       # the same loop through a DeepSpeed engine

Flags share open_clip's names where open_clip's trainer has the same thing. A run folder LOGS/NAME holds
checkpoints/step_N.pt (open_clip's checkpoint format), export/ (a local-dir: model), log.jsonl and params.json;
with --deepspeed also checkpoints/deepspeed/ (DeepSpeed's own checkpoints, used to resume). SIGUSR1 (SLURM's
pre-emption warning) makes the run checkpoint and exit with code 75, for its sbatch script to requeue it.
"""
import argparse
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import webdataset as wds
from open_clip_train.distributed import init_distributed_device
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from .. import models
from ..checkpoint import export_local_dir, load_checkpoint_file, newest_loadable_checkpoint, prune_checkpoints
from ..dims import check_dims, check_weights, parse_float_list, parse_int_list
from ..errors import ArgumentParser, TrainingHalted, UserError
from ..files import atomic_torch_save, remove_partial_files
from ..loss import MatryoshkaClipLoss
from . import deepspeed_engine as ds_engine
from .data import (
    batches_per_epoch,
    check_shards,
    count_samples,
    gather_positions,
    make_train_stream,
    position_for_rank,
    resolve_shards,
)
from .guards import (
    BAD_FRACTION_MIN_SAMPLES,
    NonFiniteSteps,
    check_bad_fraction,
    log_bad_samples,
)
from .preempt import EXIT_PREEMPTED, PreemptionSignal

LOGIT_SCALE_MAX = math.log(100)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip model name (ours: MRL-Tiny-28, ViT-B-32-768)")
    p.add_argument("--pretrained", default=None, help="initial weights: an open_clip checkpoint file")
    p.add_argument("--train-data", required=True, help="shard URLs with brace expansion, e.g. 'd/train-{0000..0099}.tar'")
    p.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch (default: from sizes.json beside the shards)")
    p.add_argument("--dataset-resampled", action="store_true", help="draw shards with replacement")
    p.add_argument("--dims", required=True, help="nested dims, strictly increasing, ending at the embedding width")
    p.add_argument("--dim-weights", default=None, help="loss weight per dim (default 1 each)")
    p.add_argument("--batch-size", type=int, default=128, help="per-rank batch size")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--grad-clip-norm", type=float, default=None)
    p.add_argument("--accum-freq", type=int, default=1,
                   help="micro-batches per step; the loss sees all their features (open_clip's scheme)")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16", "amp_bfloat16"], default="fp32")
    p.add_argument("--workers", type=int, default=1, help="data loader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-loss", action="store_true")
    p.add_argument("--gather-with-grad", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist-backend", default=None)
    p.add_argument("--dist-url", default=None)
    # --output-dir: the same; use it under torchrun, whose --logs-specs makes a bare --logs ambiguous
    p.add_argument("--logs", "--output-dir", dest="logs", default="runs", help="root folder of runs")
    p.add_argument("--name", default=None, help="run name (default: model and dims)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    p.add_argument("--save-every-n-steps", type=int, default=200)
    p.add_argument("--keep-checkpoints", type=int, default=3, help="keep the last N step checkpoints (0: all)")
    p.add_argument("--log-every-n-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for smoke runs)")
    p.add_argument("--deepspeed", default=None, metavar="CONFIG.json",
                   help="train through a DeepSpeed engine with this config (ZeRO stage, bf16/fp16); "
                        "batch sizes and clipping come from our flags")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of the samples read are bad (default 0.01)")
    p.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient (default 10)")
    args = p.parse_args(argv)
    args.dims = parse_int_list(args.dims, "--dims")
    args.dim_weights = parse_float_list(args.dim_weights, "--dim-weights") if args.dim_weights else None
    for flag in ("batch_size", "epochs", "accum_freq", "save_every_n_steps", "log_every_n_steps",
                 "max_nonfinite_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    if not 0 <= args.max_bad_fraction <= 1:
        raise UserError(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    if args.deepspeed and args.precision != "fp32":
        raise UserError("with --deepspeed, precision is set in the DeepSpeed config (bf16.enabled / fp16.enabled)")
    if args.deepspeed and args.resume not in (None, "latest") and not Path(args.resume).is_dir():
        raise UserError(f"--resume with --deepspeed takes 'latest' or a DeepSpeed checkpoint folder "
                        f"(RUN/checkpoints/deepspeed/step_N): {args.resume} is not one")
    return args


def random_seed(seed: int, rank: int) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def unwrap(model):
    return model.module if hasattr(model, "module") else model


@dataclass
class StepResult:
    loss: float
    per_dim: dict
    skipped: bool = False
    logit_scale: Optional[float] = None  # exp(logit_scale) the loss used (the engine path; ZeRO-3 shards the weight)


def train_step(model, loss_fn, optimizer, scaler, autocast, images, texts, accum_freq, grad_clip_norm):
    """One optimizer step. With accum_freq > 1, open_clip's scheme: features of all micro-batches are computed
    without grad first, then each micro-batch is re-encoded with grad and the loss sees every micro-batch's
    features, so the gradient equals that of one big batch. Unlike open_clip we let logit_scale take its gradient
    from one pass only, else it would be counted accum_freq times."""
    optimizer.zero_grad(set_to_none=True)
    if accum_freq == 1:
        with autocast():
            image_features, text_features, logit_scale = model(images, texts)
            total, per_dim = loss_fn(image_features, text_features, logit_scale)
        backward(total, scaler)
    else:
        image_chunks, text_chunks = images.chunk(accum_freq), texts.chunk(accum_freq)
        with torch.no_grad(), autocast():
            cached = [model(i, t)[:2] for i, t in zip(image_chunks, text_chunks)]
        for j, (i, t) in enumerate(zip(image_chunks, text_chunks)):
            sync = model.no_sync() if hasattr(model, "no_sync") and j < accum_freq - 1 else nullcontext()
            with sync:
                with autocast():
                    image_j, text_j, logit_scale = model(i, t)
                    if j > 0:
                        logit_scale = logit_scale.detach()
                    all_images = torch.cat([c[0] for c in cached[:j]] + [image_j] + [c[0] for c in cached[j + 1:]])
                    all_texts = torch.cat([c[1] for c in cached[:j]] + [text_j] + [c[1] for c in cached[j + 1:]])
                    total, per_dim = loss_fn(all_images, all_texts, logit_scale)
                backward(total, scaler)
    if not torch.isfinite(total) or (scaler is None and not gradients_finite(model)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float(total.detach()), {m: float(v) for m, v in per_dim.items()}, skipped=True)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return StepResult(float(total.detach()), {m: float(v) for m, v in per_dim.items()})


def gradients_finite(model) -> bool:
    """Under DDP the gradients are already all-reduced, so every rank reaches the same answer."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True


def backward(loss, scaler):
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def make_optimizer(model, args):
    # open_clip's split: no weight decay on gains, biases, embeddings and logit_scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.wd}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


def resolve_resume(resume: str, checkpoint_dir: Path):
    if resume is None:
        return None
    if resume == "latest":
        return newest_loadable_checkpoint(checkpoint_dir)  # None: a fresh start, as open_clip does
    if not Path(resume).is_file():
        raise UserError(f"--resume checkpoint not found: {resume}")
    return Path(resume)


def main(argv=None):
    args = parse_args(argv)
    width = models.embed_width(args.model)
    args.dims = check_dims(args.dims, width, must_end_at_width=True)
    args.dim_weights = check_weights(args.dim_weights, args.dims)
    check_shards(args.train_data, args.max_bad_fraction)
    if args.train_num_samples is None:
        args.train_num_samples = count_samples(args.train_data)
        if args.train_num_samples is None:
            raise UserError("no sizes.json beside the shards: pass --train-num-samples")
    if args.batch_size % args.accum_freq:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by --accum-freq {args.accum_freq}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = init_distributed_device(args)
    ds_config = None
    if args.deepspeed:
        ds_config = ds_engine.load_config(args.deepspeed, args.batch_size, args.accum_freq, args.world_size,
                                          args.grad_clip_norm)
    is_master = args.rank == 0
    args.name = args.name or f"{args.model}-mrl{'-'.join(map(str, args.dims))}"
    run_dir = Path(args.logs) / args.name
    checkpoint_dir = run_dir / "checkpoints"
    ds_dir = checkpoint_dir / "deepspeed"
    random_seed(args.seed, 0)  # same initial weights on every rank

    model, preprocess_train, _, tokenizer = models.create(args.model, args.pretrained, device=str(device))
    model_cfg = models.model_config(args.model)
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    if ds_config is not None:
        ds_engine.vector_logit_scale(model)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    autocast = get_autocast(args.precision, device_type=device.type)
    engine = None
    if ds_config is not None:
        ds_engine.ensure_process_group(device)
        engine, optimizer = ds_engine.initialize(model, optimizer, ds_config)

    global_batch = args.batch_size * args.world_size
    steps_per_epoch = batches_per_epoch(args.train_num_samples, args.batch_size, args.world_size, args.workers)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    schedule = cosine_lr(optimizer, args.lr, args.warmup, steps_per_epoch * args.epochs)

    step, run_state = 0, {}
    if engine is not None:
        step, run_state = resume_deepspeed(engine, args, ds_dir)
        random_seed(args.seed, args.rank + step)  # DeepSpeed keeps no RNG state; a resumed run draws anew
    else:
        resume_path = resolve_resume(args.resume, checkpoint_dir)
        if resume_path is not None:
            step, run_state = resume_checkpoint(resume_path, args, model, optimizer, scaler)
        else:
            random_seed(args.seed, args.rank)
    # the data stream's position, bad-sample and skipped-step counts (RUN_STATE_KEYS in the checkpoint)
    position = position_for_rank(run_state, args.rank, args.world_size, args.workers)
    nonfinite = NonFiniteSteps(args.max_nonfinite_steps)
    if run_state.get("nonfinite"):
        nonfinite.load_state_dict(run_state["nonfinite"])
    if is_master and step:
        print(f"resumed at step {step}", file=sys.stderr)
    if args.distributed and not args.dataset_resampled:
        print(f"rank {args.rank} of {args.world_size} reads shards: {' '.join(rank_shards(args.train_data))}",
              file=sys.stderr)

    if args.distributed and engine is None:
        ddp_args = {} if device.type == "cpu" else {"device_ids": [device]}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_args)
    loss_fn = MatryoshkaClipLoss(args.dims, args.dim_weights, local_loss=args.local_loss,
                                 gather_with_grad=args.gather_with_grad, rank=args.rank, world_size=args.world_size)

    if is_master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "params.json").write_text(json.dumps(vars(args), indent=1, default=str))
    log_file = open(run_dir / "log.jsonl", "a") if is_master else None
    meta = {"name": args.name, "model": args.model, "dims": args.dims, "dim_weights": args.dim_weights,
            "world_size": args.world_size, "seed": args.seed}

    def save(step, epoch):
        run_state = {"data": gather_positions(position, args.distributed, args.world_size),
                     "nonfinite": nonfinite.state_dict()}
        if engine is not None:
            # every rank writes its DeepSpeed part; rank 0 adds the fp32 open_clip checkpoint rebuilt from it
            tag = ds_engine.save(engine, ds_dir, step, {"step": step, "epoch": epoch, **meta, **run_state},
                                 args.keep_checkpoints)
            if is_master:
                atomic_torch_save(ds_engine.open_clip_checkpoint(ds_dir, tag), checkpoint_dir / f"step_{step}.pt")
                prune_checkpoints(checkpoint_dir, args.keep_checkpoints)
            return
        if not is_master:
            return
        payload = {"epoch": epoch, "state_dict": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                   "step": step, **meta, **run_state}
        if args.world_size == 1:
            payload["rng"] = [rng_state()]
        if scaler is not None:
            payload["scaler"] = scaler.state_dict()
        atomic_torch_save(payload, checkpoint_dir / f"step_{step}.pt")
        prune_checkpoints(checkpoint_dir, args.keep_checkpoints)

    preemption = PreemptionSignal()
    if is_master:
        remove_partial_files(checkpoint_dir)  # left by a run killed while saving
    progress = tqdm(total=total_steps, initial=step, desc=args.name, disable=not is_master, dynamic_ncols=True)
    (engine or model).train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        position.start_epoch(epoch)
        resumed = position.batches == done_in_epoch > 0  # else an old checkpoint: skip by batch count
        stream = make_train_stream(
            args.train_data, preprocess_train, tokenizer, args.batch_size, args.train_num_samples, epoch,
            seed=args.seed, workers=args.workers, rank=args.rank, world_size=args.world_size,
            resampled=args.dataset_resampled, skip_batches=done_in_epoch,
            consumed=position.consumed if resumed else None, bad=position.bad if resumed else None)
        position.batches = done_in_epoch
        batches = islice(stream.loader, min(steps_per_epoch - done_in_epoch, total_steps - step))
        t_data = time.perf_counter()
        step_at_epoch_start = step
        for images, texts, report in batches:
            log_bad_samples(position.update(report), step + 1, log_file)
            images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
            lr = schedule(step)
            t_step = time.perf_counter()
            if engine is not None:
                result = deepspeed_step(engine, loss_fn, images, texts, args.accum_freq)
            else:
                result = train_step(model, loss_fn, optimizer, scaler, autocast, images, texts, args.accum_freq,
                                    args.grad_clip_norm)
            step += 1
            nonfinite.update(step, result.skipped)
            progress.update(1)
            if is_master and (step % args.log_every_n_steps == 0 or step == total_steps):
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "lr": lr, "loss": result.loss,
                          "loss_dim": {str(m): v for m, v in result.per_dim.items()},
                          "logit_scale": result.logit_scale or float(unwrap(model).logit_scale.detach().exp()),
                          "samples_per_s": global_batch / max(now - t_data, 1e-9),
                          "step_s": now - t_step, "bad_samples": position.bad_samples,
                          "samples_read": position.samples_read, "skipped_step": result.skipped,
                          "skipped_steps": nonfinite.total}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                progress.set_postfix_str(" ".join(f"{m}:{v:.3f}" for m, v in result.per_dim.items()))
            if step < total_steps and preemption.agreed(device):
                save(step, step // steps_per_epoch)
                if is_master:
                    print(f"pre-empted: checkpoint at step {step} of {total_steps}; resume with --resume latest",
                          file=sys.stderr)
                finish(args)
                return EXIT_PREEMPTED
            try:
                nonfinite.check(step, checkpoint_dir)
                check_bad_fraction(position.bad_samples, position.samples_read, args.max_bad_fraction, step,
                                   min(BAD_FRACTION_MIN_SAMPLES, args.train_num_samples), checkpoint_dir)
            except TrainingHalted:
                progress.close()
                raise
            # not inside a run of skipped steps: the newest checkpoint stays one taken after a finite step
            if step % args.save_every_n_steps == 0 and step < total_steps and nonfinite.in_row == 0:
                save(step, step // steps_per_epoch)
            t_data = time.perf_counter()
        if step == step_at_epoch_start:
            raise UserError(f"the shards yielded no usable sample (every image undecodable or without a "
                            f"caption?): {args.train_data}")
    progress.close()

    save(step, step // steps_per_epoch)
    if is_master:
        export_model = unwrap(model)
        if engine is not None:  # the fp32 weights, in open_clip's layout, from the checkpoint just written
            export_model = models.create(args.model)[0]
            export_model.load_state_dict(load_checkpoint_file(checkpoint_dir / f"step_{step}.pt")["state_dict"])
        export_local_dir(export_model, model_cfg, run_dir / "export")
        print(f"done: {step} steps; checkpoint {checkpoint_dir / f'step_{step}.pt'}; "
              f"export local-dir:{run_dir / 'export'}; bad samples skipped: {position.bad_samples}; "
              f"non-finite steps skipped: {nonfinite.total}",
              file=sys.stderr)
        log_file.close()
    finish(args)
    return 0


def rank_shards(urls: str) -> list:
    """The shards webdataset's node splitter gives this rank (the same call as in the training stream)."""
    return [shard["url"] for shard in wds.split_by_node([{"url": url} for url in resolve_shards(urls)])]


def finish(args):
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


RUN_STATE_KEYS = ("data", "nonfinite")  # what a checkpoint holds beside open_clip's format for an exact resume


def resume_checkpoint(path: Path, args, model, optimizer, scaler) -> tuple[int, dict]:
    checkpoint = load_checkpoint_file(path)
    if checkpoint.get("dims") not in (None, args.dims):
        raise UserError(f"{path} was trained with --dims {checkpoint['dims']}, not {args.dims}")
    if "optimizer" not in checkpoint:
        raise UserError(f"{path} holds weights only (a DeepSpeed run's fp32 copy): resume that run with "
                        "--deepspeed, or start from these weights with --pretrained")
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit model {args.model}: {str(err).splitlines()[0]}") from None
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    if "rng" in checkpoint and checkpoint.get("world_size", 1) == args.world_size:
        set_rng_state(checkpoint["rng"][min(args.rank, len(checkpoint["rng"]) - 1)])
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return int(checkpoint["step"]), {k: checkpoint[k] for k in RUN_STATE_KEYS if k in checkpoint}


def resume_deepspeed(engine, args, ds_dir: Path) -> tuple[int, dict]:
    """--resume latest: DeepSpeed's newest complete checkpoint of this run (none yet: a fresh start);
    --resume PATH: a DeepSpeed checkpoint folder (RUN/checkpoints/deepspeed/step_N)."""
    if args.resume is None:
        return 0, {}
    if args.resume == "latest":
        tag = ds_engine.latest_tag(ds_dir)
        if tag is None:
            return 0, {}
        folder, tag = ds_dir, tag
    else:
        folder, tag = Path(args.resume).parent, Path(args.resume).name
    client_state = ds_engine.load(engine, folder, tag)
    if client_state.get("dims") not in (None, args.dims):
        raise UserError(f"{folder / tag} was trained with --dims {client_state['dims']}, not {args.dims}")
    return int(client_state["step"]), {k: client_state[k] for k in RUN_STATE_KEYS if k in client_state}


def deepspeed_step(engine, loss_fn, images, texts, accum_freq) -> StepResult:
    total, per_dim, logit_scale, stepped = ds_engine.train_step(engine, loss_fn, images, texts, accum_freq)
    if stepped:
        ds_engine.clamp_logit_scale(engine, LOGIT_SCALE_MAX)
    return StepResult(float(total.detach()), {m: float(v) for m, v in per_dim.items()}, skipped=not stepped,
                      logit_scale=float(logit_scale.detach().float().reshape(-1)[0]))
