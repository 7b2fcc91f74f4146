"""WebDataset training stream built from open_clip_train's pieces.

What we add to open_clip_train.data.get_wds_dataset, and why:
- undecodable samples are skipped *and counted*: each batch carries its worker's running count of bad samples,
  so the trainer can report (and later bound) them; open_clip only logs them;
- open_clip_train's tarfile_to_samples_nothrow breaks on webdataset 1.0.2 (KeyError 'fname': wds now yields an
  empty end-of-shard marker that open_clip's group_by_keys_nothrow does not expect); ours turns the marker off;
- the sample shuffle is seeded (detshuffle2 instead of wds.shuffle), so an epoch's stream is a function of
  (seed, epoch, rank, worker) and a resumed run can skip the samples it already used before decoding them.
"""
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import webdataset as wds
from open_clip_train.data import (
    ResampledShards2,
    detshuffle2,
    expand_urls,
    filter_no_caption_or_no_image,
    get_dataset_size,
    group_by_keys_nothrow,
)
from webdataset.tariterators import tar_file_expander, url_opener
from torch.utils.data import get_worker_info

from .errors import UserError

SHARD_SHUFFLE_BUFFER = 2000
SAMPLE_SHUFFLE_BUFFER = 2000
SAMPLE_SHUFFLE_INITIAL = 500


def resolve_shards(urls: str) -> list[str]:
    """Brace-expand `urls` ('a-{0000..0099}.tar', '::' joins lists) and check local shards exist."""
    try:
        shards, _ = expand_urls(urls)
    except Exception as err:  # braceexpand raises on malformed patterns
        raise UserError(f"cannot expand shard pattern {urls!r}: {err}") from None
    if not shards:
        raise UserError(f"shard pattern {urls!r} names no shards")
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing shard {missing[0]}{more}")
    return shards


def count_samples(urls: str) -> Optional[int]:
    """Dataset size from sizes.json / __len__ beside the shards (open_clip's convention), or None."""
    num_samples, _ = get_dataset_size(urls)
    return num_samples or None


def tarfile_to_samples_nothrow(src, handler):
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, eof_value=None)
    return group_by_keys_nothrow(files, handler=handler)


class BadSampleCounter:
    """Webdataset error handler that skips the sample and counts it (one counter per worker process)."""

    def __init__(self):
        self.count = 0
        self.last_error = ""

    def __call__(self, exn):
        self.count += 1
        self.last_error = repr(exn)[:200]
        return True


def _skip_first(src, counts: dict):
    """Drop the first counts[worker] samples of this worker's stream, once (the pipeline may repeat)."""
    info = get_worker_info()
    worker = info.id if info is not None else 0
    n = counts.get(worker, 0)
    counts[worker] = 0
    for sample in src:
        if n > 0:
            n -= 1
            continue
        yield sample


def _with_bad_count(batch, counter: BadSampleCounter):
    info = get_worker_info()
    worker = info.id if info is not None else 0
    images, texts = batch
    return images, texts, torch.tensor([worker, counter.count])


def _worker_seed(seed: int, rank: int) -> int:
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return seed + 1000 * (rank * workers + worker)


def batches_per_worker_done(batches_done: int, workers: int) -> dict:
    """The loader takes batches from its workers round-robin: how many each worker had produced."""
    workers = max(1, workers)
    return {w: len(range(w, batches_done, workers)) for w in range(workers)}


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, workers: int) -> int:
    """Batches each rank takes per epoch: enough for num_samples, rounded up so every worker makes as many
    (open_clip's rule; equal counts keep DDP ranks in step)."""
    workers = max(1, workers)
    return math.ceil(math.ceil(num_samples / (batch_size * world_size)) / workers) * workers


@dataclass
class TrainStream:
    loader: wds.WebLoader
    num_batches: int        # batches per epoch on this rank
    num_samples: int        # samples per epoch, all ranks


def make_train_stream(
        urls: str,
        preprocess: Callable,
        tokenizer: Callable,
        batch_size: int,
        num_samples: int,
        epoch: int,
        seed: int = 0,
        workers: int = 1,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        skip_batches: int = 0,
) -> TrainStream:
    """One epoch of training batches (images, tokens, [worker, bad_count]) for this rank.

    Epoch mode: shards are shuffled with (seed, epoch), split across ranks then workers, samples shuffled
    with a seeded buffer. Resampled mode: each worker draws shards with replacement from its own seed.
    `skip_batches` drops the first batches of the epoch (already trained on before a resume) without decoding.
    """
    shards = resolve_shards(urls)
    workers_eff = max(1, workers)
    if resampled:
        pipeline = [ResampledShards2(
            urls, deterministic=True, epoch=epoch - 1,  # ResampledShards2 increments before use
            worker_seed=functools.partial(_worker_seed, seed, rank))]
    else:
        if len(shards) < workers_eff * world_size:
            raise UserError(f"{len(shards)} shards cannot feed {workers_eff} workers x {world_size} ranks: "
                            "write more shards, lower --workers, or use --dataset-resampled")
        pipeline = [
            wds.SimpleShardList(shards),
            detshuffle2(bufsize=SHARD_SHUFFLE_BUFFER, initial=SHARD_SHUFFLE_BUFFER, seed=seed, epoch=epoch - 1),
            wds.split_by_node,
            wds.split_by_worker,
        ]
    bad = BadSampleCounter()
    per_worker_skip = {w: n * batch_size for w, n in batches_per_worker_done(skip_batches, workers).items()}
    pipeline += [
        functools.partial(tarfile_to_samples_nothrow, handler=bad),
        detshuffle2(bufsize=SAMPLE_SHUFFLE_BUFFER, initial=SAMPLE_SHUFFLE_INITIAL, seed=seed + 7919 * rank,
                    epoch=epoch - 1),
        wds.select(filter_no_caption_or_no_image),
        functools.partial(_skip_first, counts=per_worker_skip),
        wds.decode("pilrgb", handler=bad),
        wds.rename(image="jpg;png;jpeg;webp", text="txt", handler=bad),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0], handler=bad),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
        wds.map(functools.partial(_with_bad_count, counter=bad)),
    ]
    dataset = wds.DataPipeline(*pipeline)

    global_batch = batch_size * world_size
    num_batches = batches_per_epoch(num_samples, batch_size, world_size, workers)
    dataset = dataset.with_epoch(num_batches // workers_eff)
    # seeds the workers' torch RNG (augmentations) from (seed, epoch, rank), not from the trainer's RNG state
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=False, generator=generator)
    return TrainStream(loader=loader, num_batches=num_batches, num_samples=num_batches * global_batch)
