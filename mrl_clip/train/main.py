"""Matryoshka CLIP training on WebDataset shards (one process, or torchrun / srun with DDP or DeepSpeed).

    python -m mrl_clip.train --model MRL-Tiny-28 --train-data 'shards/train-{0000..0009}.tar' \
        --dims 8,16,32,64,128,256 --batch-size 128 --epochs 1 --logs runs --name mrl
    ... --deepspeed configs/ds_zero2_bf16.json       # the same loop through a DeepSpeed engine
    ... --siglip                                       # open_clip's sigmoid (SigLIP) loss at every prefix

Flags share open_clip's names where open_clip's trainer has the same thing. A run folder LOGS/NAME holds
checkpoints/step_N.pt (open_clip's checkpoint format), export/ (a local-dir: model), log.jsonl and params.json;
with --deepspeed, checkpoints/deepspeed/step_N (DeepSpeed's own checkpoints, used to resume) and step_N.pt for the
last step only. SIGUSR1 (SLURM's pre-emption warning) makes the run checkpoint and exit with code 75, for its
sbatch script to requeue it. --val-data measures a CLIP_benchmark folder at every dim during training
(validate.py: log.jsonl records with "val_dim"); --report-to tensorboard writes RUN/tensorboard (tensorboard_log.py).

This file sets a run up; loop.py runs its epochs and steps.
"""
import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from open_clip_train.distributed import init_distributed_device
from open_clip_train.main import random_seed
from open_clip_train.precision import get_autocast
from tqdm import tqdm

from .. import models
from ..checkpoint import export_local_dir, nesting_record
from ..dims import check_dims, check_weights, parse_float_list, parse_int_list
from ..errors import ArgumentParser, UserError
from ..files import remove_partial_files
from ..loss import MatryoshkaClipLoss, MatryoshkaSigLipLoss
from . import (compiled, data_flags, deepspeed_engine, distill, epoch_checkpoints, feature_cache, finetune,
               layer_decay, layered, locked_towers, lr_schedule, open_clip_flags, remote_sync, tensorboard_log,
               text_log, validate, wandb_log)
from .agree import RankAgreement
from .csv_source import CsvSource, read_csv
from .engine import RunState
from .guards import NonFiniteSteps
from .loop import Run, save, train_one_epoch
from .plain_engine import PlainEngine, clamp_logit_scale, make_optimizer
from .position import position_for_rank
from .preempt import EXIT_PREEMPTED, PreemptionSignal
from .shards import check_shards, count_samples, resolve_shards
from .stream import StreamSettings, rank_shards


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip model name (ours: MRL-Tiny-28, ViT-B-32-768)")
    p.add_argument("--pretrained", default=None,
                   help="initial weights: an open_clip checkpoint file, or a pretrained tag of --model")
    p.add_argument("--train-data", required=True,
                   help="shard URLs with brace expansion, e.g. 'd/train-{0000..0099}.tar'")
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
    p.add_argument("--opt", type=str, default="adamw", help="the optimizer: adamw only (open_clip's default)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--grad-clip-norm", type=float, default=None)
    p.add_argument("--accum-freq", type=int, default=1,
                   help="loader batches of --batch-size per optimizer step; the loss sees all their features "
                        "(open_clip's scheme: a contrastive batch of batch size x accum-freq)")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16", "amp_bfloat16"], default="fp32")
    p.add_argument("--workers", type=int, default=1, help="data loader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-loss", action="store_true", help="CLIP loss: logits of this rank's rows only")
    p.add_argument("--gather-with-grad", action="store_true", help="CLIP loss: gather features with gradients")
    p.add_argument("--siglip", action="store_true",
                   help="open_clip's sigmoid (SigLIP) loss at every prefix instead of the CLIP loss; as with "
                        "open_clip_train the model gets logit_scale log(10) and a logit_bias of -10, and "
                        "--local-loss / --gather-with-grad do not apply")
    p.add_argument("--loss-dist-impl", choices=["bidir", "shift", "reduce", "gather"], default=None,
                   help="with --siglip, how ranks exchange text features (open_clip's SigLipLoss; default bidir)")
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
    finetune.add_flags(p)
    layered.add_flags(p)
    feature_cache.add_flags(p)
    validate.add_flags(p)
    tensorboard_log.add_flags(p)
    text_log.add_flags(p)
    lr_schedule.add_flags(p)
    epoch_checkpoints.add_flags(p)
    remote_sync.add_flags(p)
    wandb_log.add_flags(p)
    data_flags.add_flags(p)
    distill.add_flags(p)
    layer_decay.add_flags(p)
    compiled.add_flags(p)
    open_clip_flags.add_flags(p)  # last: open_clip's flags refused here, each with its line
    args = p.parse_args(argv)
    data_flags.check_flags(args)
    finetune.check_flags(args)
    layered.check_flags(args)
    feature_cache.check_flags(args)
    validate.check_flags(args)
    tensorboard_log.check_flags(args)
    lr_schedule.check_flags(args)
    epoch_checkpoints.check_flags(args)
    remote_sync.check_flags(args)
    distill.check_flags(args)
    layer_decay.check_flags(args)
    args.dims = parse_int_list(args.dims, "--dims")
    args.dim_weights = parse_float_list(args.dim_weights, "--dim-weights") if args.dim_weights else None
    for flag in ("batch_size", "epochs", "accum_freq", "save_every_n_steps", "log_every_n_steps",
                 "max_nonfinite_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.opt != "adamw":
        raise UserError(f"--opt {args.opt}: mrl_clip.train trains with AdamW only (open_clip's default adamw; its "
                        "timm optimizers are not offered)")
    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    for flag, ok, rule in [("--lr", args.lr > 0, "above 0"), ("--wd", args.wd >= 0, "0 or more"),
                           ("--beta1", 0 <= args.beta1 < 1, "in [0, 1)"), ("--beta2", 0 <= args.beta2 < 1, "in [0, 1)"),
                           ("--eps", args.eps > 0, "above 0"), ("--warmup", args.warmup >= 0, "0 or more"),
                           ("--grad-clip-norm", args.grad_clip_norm is None or args.grad_clip_norm > 0, "above 0")]:
        if not ok:  # NaN fails every rule
            raise UserError(f"{flag} must be {rule}, got {getattr(args, flag[2:].replace('-', '_'))}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise UserError(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    if args.deepspeed and args.precision != "fp32":
        raise UserError("with --deepspeed, precision is set in the DeepSpeed config (bf16.enabled / fp16.enabled)")
    if args.deepspeed and args.resume not in (None, "latest") and not Path(args.resume).is_dir():
        raise UserError(f"--resume with --deepspeed takes 'latest' or a DeepSpeed checkpoint folder "
                        f"(RUN/checkpoints/deepspeed/step_N): {args.resume} is not one")
    return args


def main(argv=None):
    args = parse_args(argv)
    csv = check_inputs(args)
    device = init_distributed_device(args)
    ds_config = None
    if args.deepspeed:
        ds_config = deepspeed_engine.load_config(args.deepspeed, args.batch_size, args.accum_freq, args.world_size,
                                                 args.grad_clip_norm)
        if args.val_data and deepspeed_engine.zero_stage(ds_config) == 3:
            raise UserError("--val-data is not supported under ZeRO stage 3 (rank 0 would need the partitioned "
                            "weights gathered): validate the checkpoints with python -m mrl_clip.eval")
        if args.feature_cache and deepspeed_engine.zero_stage(ds_config) == 3:
            raise UserError("--feature-cache is not supported under ZeRO stage 3 (the locked weights are "
                            "partitioned across ranks): use stage 1 or 2")
    args.name = args.name or f"{args.model}-mrl{'-'.join(map(str, args.dims))}"
    run_dir = Path(args.logs) / args.name

    random_seed(args.seed, 0)  # the same initial weights on every rank
    model, preprocess_train, preprocess_val, tokenizer = models.create(
        args.model, args.pretrained, device=str(device), pretrained_image=args.pretrained_image, siglip=args.siglip,
        open_clip_kwargs=data_flags.model_kwargs(args))
    teacher = distill.make_teacher(args, device, model, tokenizer) if distill.enabled(args) else None
    clamp_logit_scale(model)
    finetune.apply(model, args)  # before the optimizer (it holds trainable parameters only) and any resume
    if layered.layered_towers(args):
        layered.check_model(model, args)
    trunks = deterministic_towers(args, model)
    if args.deterministic_towers:
        preprocess_train = preprocess_val
    compiled.apply(model, args)
    engine, optimizer = make_engine(args, model, device, ds_config)
    resumed, rng_restored = engine.load_checkpoint(args.resume, run_dir / "checkpoints", RunState.of_args(args))
    features = cached_features(args, engine, trunks, preprocess_val, tokenizer) if args.feature_cache else None
    step = resumed.step if resumed else 0
    if not rng_restored:
        random_seed(args.seed + step * args.world_size, args.rank)  # a stream of its own for each (rank, step)
    if args.distributed and ds_config is None:
        engine.distribute(device)
    if args.rank == 0 and step:
        print(f"resumed at step {step}", file=sys.stderr)

    run = make_run(args, engine, optimizer, preprocess_train, tokenizer, run_dir, resumed, features, csv)
    text_log.start(args, run_dir)  # from here: a refused run leaves no folder behind
    if teacher is not None:
        run.loss_fn = distill.make_loss(args, teacher)
    if features is not None:
        run.swap = functools.partial(locked_towers.swapped, model, trunks)
    if layered.layered_towers(args):
        layered.install_forward(model, args, cached={t.tower for t in trunks} if features is not None else set())
    if args.val_data:
        run.val = make_validation(args, preprocess_val, run)
        validate.catch_up(run, resumed.validated_step if resumed else None)
    with remote_sync.syncing(args, run_dir):  # its last sync after the files below are complete
        finished = train(run)
        if finished:
            save(run)
            epoch_checkpoints.write(run)
            if args.rank == 0:
                export(run)
        run.progress.close()
        if run.log_file is not None:
            run.log_file.close()
        if run.writer is not None:
            run.writer.close()
    run.agreement.close()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    text_log.stop()
    return 0 if finished else EXIT_PREEMPTED


def check_inputs(args) -> Optional[CsvSource]:
    """The flags checked against the model and the data; with --dataset-type csv, the table read."""
    args.dims = check_dims(args.dims, models.embed_width(args.model), must_end_at_width=True)
    args.dim_weights = check_weights(args.dim_weights, args.dims)
    finetune.check_pretrained_image(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset_type == "csv":
        csv = read_csv(args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator)
        args.train_num_samples = args.train_num_samples or len(csv.images)
        return csv
    check_shards(args.train_data, args.max_bad_fraction)
    if args.train_num_samples is None:
        args.train_num_samples = count_samples(args.train_data)
        if args.train_num_samples is None:
            raise UserError("no sizes.json beside the shards: pass --train-num-samples")
    return None


def deterministic_towers(args, model) -> list:
    """--deterministic-towers: the fully locked trunks, pinned in eval mode (with --feature-cache every locked
    tower must be one), and the line that says so."""
    if not args.deterministic_towers:
        return []
    trunks, refused = locked_towers.fully_locked(model, args, strict=bool(args.feature_cache))
    if args.feature_cache and not trunks:
        raise UserError("--feature-cache: no tower is fully locked")
    locked_towers.pin_eval(trunks)
    if args.rank == 0:
        print(feature_cache.describe(trunks, refused, bool(args.feature_cache)), file=sys.stderr)
    return trunks


def cached_features(args, engine, trunks, preprocess_val, tokenizer):
    """--feature-cache: the trunks' stored outputs, built where missing, under the precision the training forward
    runs them in (the DeepSpeed engine's weight dtype, or --precision's autocast)."""
    dtype = getattr(engine, "dtype", torch.float32)
    precision = f"deepspeed-{dtype}" if args.deepspeed else args.precision
    autocast = get_autocast(args.precision, device_type=torch.device(args.device).type)
    model_cfg = data_flags.config_overrides(models.model_config(args.model), args)
    return feature_cache.prepare(args, trunks, model_cfg, preprocess_val, tokenizer,
                                 autocast, dtype, precision, resolve_shards(args.train_data, allow_missing=True))


def make_engine(args, model, device, ds_config):
    """(engine, the optimizer the learning-rate schedule sets) for the plain loop or DeepSpeed."""
    if ds_config is not None:
        deepspeed_engine.vector_logit_scale(model)  # before the optimizer is made: it holds this parameter
    optimizer = make_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps,
                               groups=layer_decay.param_groups(model, args))
    if ds_config is None:
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "amp")
        return PlainEngine(model, optimizer, scaler, args.grad_clip_norm, args.rank, args.world_size), optimizer
    deepspeed_engine.ensure_process_group(device)
    engine, ds_optimizer = deepspeed_engine.initialize(model, optimizer, ds_config)
    return deepspeed_engine.DeepSpeedEngine(engine, args.model), ds_optimizer


def make_run(args, engine, optimizer, preprocess, tokenizer, run_dir: Path, resumed: Optional[RunState],
             features=None, csv: Optional[CsvSource] = None) -> Run:
    """The run at its first step: 0, or the step `resumed` from, with its streams' positions and counts."""
    step = resumed.step if resumed else 0
    stream = StreamSettings(args.train_data, preprocess, tokenizer, args.batch_size, args.train_num_samples,
                            seed=args.seed, workers=args.workers, rank=args.rank, world_size=args.world_size,
                            resampled=args.dataset_resampled, accum_freq=args.accum_freq,
                            features=features, weights=args.train_data_upsampling_factors, csv=csv)
    steps_per_epoch = stream.batches_per_epoch // args.accum_freq
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or steps_per_epoch * args.epochs)
    nonfinite = NonFiniteSteps(args.max_nonfinite_steps)
    if resumed and resumed.nonfinite:
        nonfinite.load_state_dict(resumed.nonfinite)
    log_file = writer = None
    if args.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "params.json").write_text(json.dumps(vars(args), indent=1, default=str))
        remove_partial_files(run_dir / "checkpoints")  # left by a run killed while saving
        log_file = open(run_dir / "log.jsonl", "a")
        writer = wandb_log.combined(
            ([tensorboard_log.make_writer(run_dir, step)] if "tensorboard" in args.report_to else []) +
            ([wandb_log.make_writer(args)] if "wandb" in args.report_to else []))
    return Run(
        args=args, engine=engine, step=step, run_dir=run_dir, stream=stream, tokenizer=tokenizer,
        loss_fn=make_loss(args),
        autocast=get_autocast(args.precision, device_type=torch.device(args.device).type),
        schedule=layer_decay.scheduled(lr_schedule.make(args, optimizer, steps_per_epoch), optimizer),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        position=position_for_rank(resumed.data if resumed else [], args.rank, args.world_size, args.workers),
        nonfinite=nonfinite, agreement=RankAgreement(PreemptionSignal(), args.distributed), log_file=log_file,
        progress=tqdm(total=total_steps, initial=step, desc=args.name, disable=args.rank != 0, dynamic_ncols=True),
        writer=writer)


def make_validation(args, preprocess_val, run: Run) -> validate.Validation:
    """--val-data read with the model's validation transform, on the run's schedule and dims. Building the reader
    (webdataset, through CLIP_benchmark) draws from Python's global RNG: it gets its state back, so a run with
    --val-data checkpoints the same RNG states as one without."""
    with validate.preserved_rng():
        val_set = validate.load_val_set(args.val_data, preprocess_val)
    schedule = validate.ValSchedule(args.val_every_n_steps, args.val_frequency, run.steps_per_epoch,
                                    run.total_steps)
    return validate.Validation(val_set, schedule, args.dims)


def make_loss(args):
    """The Matryoshka CLIP or SigLIP loss; with --image-layers / --text-layers, over every exit too."""
    if args.siglip:
        loss = MatryoshkaSigLipLoss(args.dims, args.dim_weights, rank=args.rank, world_size=args.world_size,
                                    dist_impl=args.loss_dist_impl)
    else:
        loss = MatryoshkaClipLoss(args.dims, args.dim_weights, local_loss=args.local_loss,
                                  gather_with_grad=args.gather_with_grad, rank=args.rank, world_size=args.world_size)
    return layered.make_loss(args, loss) if layered.layered_towers(args) else loss


def train(run: Run) -> bool:
    """Epochs until the planned step; False when pre-empted."""
    run.engine.train()
    while run.step < run.total_steps:
        epoch = run.step // run.steps_per_epoch
        args = run.args
        if args.distributed and not args.dataset_resampled and args.dataset_type == "webdataset":
            shards = rank_shards(args.train_data, args.seed, epoch, args.rank, args.world_size)
            listed = " ".join(shards) if len(shards) <= 16 else f"{' '.join(shards[:8])} ... ({len(shards)} shards)"
            print(f"rank {args.rank} of {args.world_size}, epoch {epoch}, reads shards: {listed}", file=sys.stderr)
        if not train_one_epoch(run, epoch):
            return False
    return True


def export(run: Run) -> None:
    """Rank 0, after the last save: RUN/export (local-dir:, plain open_clip loads it)."""
    model = run.engine.export_model(run.checkpoint_dir, run.step)
    args = run.args
    model_cfg = data_flags.config_overrides(models.training_config(args.model, args.siglip), args)
    export_local_dir(model, model_cfg, run.run_dir / "export",
                     nesting_record(args.dims, getattr(args, "image_layers", None), getattr(args, "text_layers", None)))
    print(f"done: {run.step} steps; checkpoint {run.checkpoint_dir / f'step_{run.step}.pt'}; "
          f"export local-dir:{run.run_dir / 'export'}; bad samples skipped: {run.position.bad_samples}; "
          f"non-finite steps skipped: {run.nonfinite.total}", file=sys.stderr)
