"""Matryoshka CLIP training on WebDataset shards (one process, or torchrun / srun with DDP).

    python -m mrl_clip.train --model MRL-Tiny-28 --train-data 'shards/train-{0000..0009}.tar' \
        --dims 8,16,32,64,128,256 --batch-size 128 --epochs 1 --logs runs --name mrl

Flags share open_clip's names where open_clip's trainer has the same thing. A run folder LOGS/NAME holds
checkpoints/step_N.pt (open_clip's checkpoint format), export/ (a local-dir: model), log.jsonl and params.json.
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

import numpy as np
import torch
from open_clip_train.distributed import init_distributed_device
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from . import models
from .checkpoint import atomic_torch_save, export_local_dir, latest_checkpoint, load_checkpoint_file, \
    prune_checkpoints
from .data import batches_per_epoch, count_samples, make_train_stream, resolve_shards
from .dims import check_dims, check_weights, parse_float_list, parse_int_list
from .errors import ArgumentParser, UserError, run_cli
from .loss import MatryoshkaClipLoss

LOGIT_SCALE_MAX = math.log(100)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)
    args.dims = parse_int_list(args.dims, "--dims")
    args.dim_weights = parse_float_list(args.dim_weights, "--dim-weights") if args.dim_weights else None
    for flag in ("batch_size", "epochs", "accum_freq", "save_every_n_steps", "log_every_n_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
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
    if not torch.isfinite(total):
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
        return latest_checkpoint(checkpoint_dir)  # None: a fresh start, as open_clip does
    if not Path(resume).is_file():
        raise UserError(f"--resume checkpoint not found: {resume}")
    return Path(resume)


def main(argv=None):
    args = parse_args(argv)
    width = models.embed_width(args.model)
    args.dims = check_dims(args.dims, width, must_end_at_width=True)
    args.dim_weights = check_weights(args.dim_weights, args.dims)
    resolve_shards(args.train_data)
    if args.train_num_samples is None:
        args.train_num_samples = count_samples(args.train_data)
        if args.train_num_samples is None:
            raise UserError("no sizes.json beside the shards: pass --train-num-samples")
    if args.batch_size % args.accum_freq:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by --accum-freq {args.accum_freq}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = init_distributed_device(args)
    is_master = args.rank == 0
    args.name = args.name or f"{args.model}-mrl{'-'.join(map(str, args.dims))}"
    run_dir = Path(args.logs) / args.name
    checkpoint_dir = run_dir / "checkpoints"
    random_seed(args.seed, 0)  # same initial weights on every rank

    model, preprocess_train, _, tokenizer = models.create(args.model, args.pretrained, device=str(device))
    model_cfg = models.model_config(args.model)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    autocast = get_autocast(args.precision, device_type=device.type)

    global_batch = args.batch_size * args.world_size
    steps_per_epoch = batches_per_epoch(args.train_num_samples, args.batch_size, args.world_size, args.workers)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    schedule = cosine_lr(optimizer, args.lr, args.warmup, steps_per_epoch * args.epochs)

    step = 0
    resume_path = resolve_resume(args.resume, checkpoint_dir)
    if resume_path is not None:
        checkpoint = load_checkpoint_file(resume_path)
        if checkpoint.get("dims") not in (None, args.dims):
            raise UserError(f"{resume_path} was trained with --dims {checkpoint['dims']}, not {args.dims}")
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            raise UserError(f"{resume_path} does not fit model {args.model}: {str(err).splitlines()[0]}") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        step = int(checkpoint["step"])
        if "rng" in checkpoint and checkpoint.get("world_size", 1) == args.world_size:
            set_rng_state(checkpoint["rng"][min(args.rank, len(checkpoint["rng"]) - 1)])
        if is_master:
            print(f"resumed from {resume_path} at step {step}", file=sys.stderr)
    else:
        random_seed(args.seed, args.rank)

    if args.distributed:
        ddp_args = {} if device.type == "cpu" else {"device_ids": [device]}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_args)
    loss_fn = MatryoshkaClipLoss(args.dims, args.dim_weights, local_loss=args.local_loss,
                                 gather_with_grad=args.gather_with_grad, rank=args.rank, world_size=args.world_size)

    if is_master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "params.json").write_text(json.dumps(vars(args), indent=1, default=str))
    log_file = open(run_dir / "log.jsonl", "a") if is_master else None

    def save(step, epoch):
        if not is_master:
            return
        rng = [rng_state()] if args.world_size == 1 else None
        payload = {"epoch": epoch, "name": args.name, "state_dict": unwrap(model).state_dict(),
                   "optimizer": optimizer.state_dict(), "step": step, "model": args.model, "dims": args.dims,
                   "dim_weights": args.dim_weights, "world_size": args.world_size, "seed": args.seed}
        if rng is not None:
            payload["rng"] = rng
        if scaler is not None:
            payload["scaler"] = scaler.state_dict()
        atomic_torch_save(payload, checkpoint_dir / f"step_{step}.pt")
        prune_checkpoints(checkpoint_dir, args.keep_checkpoints)

    bad_by_worker: dict = {}
    progress = tqdm(total=total_steps, initial=step, desc=args.name, disable=not is_master, dynamic_ncols=True)
    model.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        stream = make_train_stream(
            args.train_data, preprocess_train, tokenizer, args.batch_size, args.train_num_samples, epoch,
            seed=args.seed, workers=args.workers, rank=args.rank, world_size=args.world_size,
            resampled=args.dataset_resampled, skip_batches=done_in_epoch)
        batches = islice(stream.loader, min(steps_per_epoch - done_in_epoch, total_steps - step))
        t_data = time.perf_counter()
        step_at_epoch_start = step
        for images, texts, bad in batches:
            bad_by_worker[(epoch, int(bad[0]))] = int(bad[1])
            images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
            lr = schedule(step)
            t_step = time.perf_counter()
            result = train_step(model, loss_fn, optimizer, scaler, autocast, images, texts, args.accum_freq,
                                args.grad_clip_norm)
            step += 1
            progress.update(1)
            if is_master and (step % args.log_every_n_steps == 0 or step == total_steps):
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "lr": lr, "loss": result.loss,
                          "loss_dim": {str(m): v for m, v in result.per_dim.items()},
                          "logit_scale": float(unwrap(model).logit_scale.detach().exp()),
                          "samples_per_s": global_batch / max(now - t_data, 1e-9),
                          "step_s": now - t_step, "bad_samples": sum(bad_by_worker.values()),
                          "skipped_step": result.skipped}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                progress.set_postfix_str(" ".join(f"{m}:{v:.3f}" for m, v in result.per_dim.items()))
            if step % args.save_every_n_steps == 0 and step < total_steps:
                save(step, step // steps_per_epoch)
            t_data = time.perf_counter()
        if step == step_at_epoch_start:
            raise UserError(f"the shards yielded no usable sample (every image undecodable or without a "
                            f"caption?): {args.train_data}")
    progress.close()

    save(step, step // steps_per_epoch)
    if is_master:
        export_local_dir(unwrap(model), model_cfg, run_dir / "export")
        print(f"done: {step} steps; checkpoint {checkpoint_dir / f'step_{step}.pt'}; "
              f"export local-dir:{run_dir / 'export'}; bad samples skipped: {sum(bad_by_worker.values())}",
              file=sys.stderr)
        log_file.close()
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
