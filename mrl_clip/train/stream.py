"""The WebDataset training stream built from open_clip_train's pieces.

What we add to open_clip_train.data.get_wds_dataset, and why:
- bad data (a truncated or missing shard, an undecodable image, a missing or empty caption) is skipped *and
  counted*: each batch carries its worker's running count and the new bad samples' shard:key names, so the trainer
  can log them and bound them (--max-bad-fraction); open_clip only logs them;
- open_clip_train's tarfile_to_samples_nothrow breaks on webdataset 1.0.2 (KeyError 'fname': wds now yields an
  empty end-of-shard marker that open_clip's group_by_keys_nothrow does not expect); ours groups each shard on
  its own, so no sample spans two shards;
- the sample shuffle is seeded (detshuffle2 instead of wds.shuffle), so an epoch's stream is a function of
  (seed, epoch, rank, worker), and each batch carries how many samples its worker has read: the trainer keeps that
  position in its checkpoint and a resumed stream skips exactly those samples, before decoding;
- random augmentations are seeded per sample from (seed, epoch, shard, key), so a resumed run draws the same crops;
- a resume after a number of batches that is not a multiple of the workers rotates the workers' roles, so the
  loader's round-robin continues with the worker that was next;
- a worker's epoch repeats passes over its shards until it has made its batches (webdataset's `with_epoch`), but a
  pass that only skipped samples read before a resume does not end the epoch (webdataset stops on any empty pass);
- shards are split across ranks by the trainer's own rank and world size, not by environment variables.
"""
import functools
import hashlib
import itertools
import math
import os
import random
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Optional

import torch
import webdataset as wds
from open_clip_train.data import ResampledShards2, detshuffle2, group_by_keys_nothrow
from torch.utils.data import get_worker_info
from webdataset.autodecode import imagehandler
from webdataset.tariterators import tar_file_expander, url_opener

from ..errors import UserError
from .csv_source import IMAGE_PATH, with_image
from .shards import resolve_shards

SHARD_SHUFFLE_BUFFER = 2000
SAMPLE_SHUFFLE_BUFFER = 2000
SAMPLE_SHUFFLE_INITIAL = 500
IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
SHARD_END = object()  # what the tar reader yields after each shard's members


def tarfile_to_samples_nothrow(src, handler):
    """open_clip's grouping of tar members into samples, one shard at a time: webdataset 1.0.2 ends each shard
    with an empty marker, which open_clip's group_by_keys_nothrow cannot read, and without it a sample could take
    its image from the end of one shard and its caption from the start of the next. (webdataset's own
    tarfile_to_samples splits shards too, but drops a sample whose key repeats and names its errors without the
    shard: the fuzz tests reject it.)"""
    files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=SHARD_END)
    for is_end, read in itertools.groupby(files, key=lambda f: f is SHARD_END):
        # a shard cut short by an error gets no end marker: its url still tells it from the next shard
        for _, shard_files in itertools.groupby(() if is_end else read, key=lambda f: f["__url__"]):
            yield from group_by_keys_nothrow(shard_files, handler=handler)


def logical_worker(offset: int) -> tuple[int, int]:
    """(worker, workers) as the stream sees them: the loader's worker `id` plays worker (id + offset) % workers."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + offset) % info.num_workers, info.num_workers


class WorkerTracker:
    """One worker's view of its stream, and the webdataset error handler: it skips the samples read before a
    resume (`consumed`), counts samples read since, and counts and names bad ones. Pickled into each loader
    worker, it holds every worker's resume values and picks its own on first use."""

    def __init__(self, offset: int = 0, consumed: Optional[dict] = None, bad: Optional[dict] = None):
        self.offset, self.resume_consumed, self.resume_bad = offset, consumed or {}, bad or {}
        self.worker = None

    def skipping(self) -> bool:
        """Whether samples read before the resume are still to be skipped."""
        self._start()
        return self.to_skip > 0

    def _start(self):
        if self.worker is None:
            self.worker, _ = logical_worker(self.offset)
            self.to_skip = self.consumed = int(self.resume_consumed.get(self.worker, 0))
            self.bad = int(self.resume_bad.get(self.worker, 0))
            self.unreported: list[tuple[int, str]] = []  # (bad count after it, shard:key: what was wrong)

    def __call__(self, exn) -> bool:
        self._start()
        # while skipping, errors are those of samples read before the resume: already in its bad count
        if self.to_skip == 0:
            self.record(f"{type(exn).__name__}: {' '.join(map(str, exn.args))}")
        return True

    def record(self, message: str) -> None:
        self.bad += 1
        self.unreported.append((self.bad, message[:300]))

    def mark(self) -> torch.Tensor:
        """Position and bad count as of a sample handed on: a batch reports its last sample's (the batcher
        reads one sample ahead, which belongs to the next batch)."""
        return torch.tensor([self.consumed, self.bad])

    def skip_and_count(self, src):
        for sample in src:
            self._start()
            if self.to_skip > 0:
                self.to_skip -= 1
                continue
            self.consumed += 1
            yield sample

    def report(self, mark: torch.Tensor) -> dict:
        """What a batch carries: this worker's position and bad count after its last sample, and the bad samples
        met since the previous batch."""
        consumed, bad = int(mark[0]), int(mark[1])
        new_bad = [message for count, message in self.unreported if count <= bad]
        self.unreported = [(count, message) for count, message in self.unreported if count > bad]
        return {"worker": self.worker, "consumed": consumed, "bad": bad, "new_bad": new_bad}


def sample_seed(seed: int, epoch: int, url: str, key: str) -> int:
    text = f"{seed}:{epoch}:{os.path.basename(str(url))}:{key}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def call_seeded(fn, x, seed: int):
    """fn(x) with torch's CPU and Python's global RNGs seeded to `seed`, both restored afterwards (what
    torch.random.fork_rng does, without torch.manual_seed's per-call cost of visiting every device type)."""
    generator = torch.default_generator
    torch_state, python_state = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        return fn(x)
    finally:
        generator.set_state(torch_state)
        random.setstate(python_state)


class BadSample(Exception):
    """A sample the stream skips and counts; its message names it shard:key."""


def sample_name(sample) -> str:
    return f"{os.path.basename(str(sample.get('__url__', '?')))}:{sample.get('__key__')}"


def sample_caption(sample, where: str) -> tuple[str, str]:
    """(caption, image key) of a sample; BadSample when it has no image or no usable caption."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None or "txt" not in sample:
        raise BadSample(f"{where}: no {'image' if image_key is None else 'caption'}")
    try:
        text = sample["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample(f"{where}: caption is not UTF-8") from None
    if not text.strip():
        raise BadSample(f"{where}: empty caption")
    return text, image_key


def decode_image(sample, where: str, image_key: str):
    """The sample's image as a PIL RGB image; BadSample when it does not decode."""
    try:
        return imagehandler("pilrgb")(image_key, sample[image_key])
    except Exception as err:  # PIL raises several kinds; their messages name an in-memory buffer
        raise BadSample(f"{where}: undecodable {image_key} ({type(err).__name__})") from None


def transform_failed(where: str, err: Exception) -> BadSample:
    return BadSample(f"{where}: {type(err).__name__}: {str(err)[:200]}")


def sample_inputs(sample, where: str, preprocess: Callable, tokenizer: Callable, seed: int, epoch: int,
                  features=None) -> tuple:
    """(image tensor, tokens) of a sample, or for a tower in `features` (feature_cache.FeatureLookup) its stored
    trunk output instead; BadSample as the uncached stream would skip it."""
    if IMAGE_PATH in sample:  # a csv row: its image file, read now (csv_source)
        path, sample = sample[IMAGE_PATH], with_image(sample, IMAGE_KEYS)
        if not any(k in sample for k in IMAGE_KEYS):
            raise BadSample(f"{where}: cannot read image file {path}")
    text, image_key = sample_caption(sample, where)
    if features is not None and features.has("image"):
        image = features.get("image", sample, where)
    else:
        image = decode_image(sample, where, image_key)
        try:
            image = call_seeded(preprocess, image, sample_seed(seed, epoch, sample.get("__url__"), sample["__key__"]))
        except Exception as err:
            raise transform_failed(where, err) from None
    if features is not None and features.has("text"):
        return image, features.get("text", sample, where)
    try:
        return image, tokenizer(text)[0]
    except Exception as err:
        raise transform_failed(where, err) from None


def decode_samples(src, tracker: WorkerTracker, preprocess: Callable, tokenizer: Callable, seed: int, epoch: int,
                   features=None):
    """(image tensor, tokens) for each good sample; a bad one is counted and named shard:key."""
    for sample in src:
        try:
            image, tokens = sample_inputs(sample, sample_name(sample), preprocess, tokenizer, seed, epoch, features)
        except BadSample as err:
            tracker.record(str(err))
            continue
        yield image, tokens, tracker.mark()


def _with_report(batch, tracker: WorkerTracker):
    images, texts, marks = batch
    return images, texts, tracker.report(marks[-1])


def _split_by_rank(src, rank: int, world_size: int):
    yield from islice(src, rank, None, world_size)


def _split_by_logical_worker(src, offset: int):
    worker, workers = logical_worker(offset)
    yield from islice(src, worker, None, workers)


def _worker_seed(seed: int, rank: int, offset: int) -> int:
    worker, workers = logical_worker(offset)
    return seed + 1000 * (rank * workers + worker)


def batches_per_worker_done(batches_done: int, workers: int) -> dict:
    """The loader takes batches from its workers round-robin: how many each worker had produced."""
    workers = max(1, workers)
    return {w: len(range(w, batches_done, workers)) for w in range(workers)}


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, workers: int, accum_freq: int = 1) -> int:
    """Loader batches each rank takes per epoch: enough for num_samples, rounded up so every worker makes as many
    (open_clip's rule; equal counts keep DDP ranks in step) and the epoch is whole optimizer steps of accum_freq
    batches each."""
    rounding = math.lcm(max(1, workers), accum_freq)
    return math.ceil(math.ceil(num_samples / (batch_size * world_size)) / rounding) * rounding


def rank_shards(urls: str, seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """The shards this rank reads in `epoch`'s first pass: the stream's own shuffle and split."""
    shuffled = detshuffle2(bufsize=SHARD_SHUFFLE_BUFFER, initial=SHARD_SHUFFLE_BUFFER, seed=seed, epoch=epoch - 1)
    return list(_split_by_rank(shuffled.run(iter(resolve_shards(urls, allow_missing=True))), rank, world_size))


class EpochPipeline(wds.DataPipeline):
    """webdataset's pipeline with `with_epoch`: passes over the worker's shards repeat until the epoch's batches
    are made, and a pass that yields nothing ends it (else all-bad data would loop forever) — unless the pass was
    skipping the samples read before a resume: near an epoch's end those can be a whole pass."""

    def __init__(self, *stages, tracker: WorkerTracker):
        super().__init__(*stages)
        self.tracker = tracker

    def iterator(self):
        for _ in range(self.repetitions):
            skipping = self.tracker.skipping()
            count = 0
            for sample in self.iterator1():
                yield sample
                count += 1
            if count == 0 and not skipping:
                break


@dataclass
class TrainStream:
    loader: wds.WebLoader
    num_batches: int        # batches per epoch on this rank
    num_samples: int        # samples per epoch, all ranks


@dataclass(frozen=True)
class StreamSettings:
    """What a run's stream is, the same every epoch (main.py builds it once from the flags)."""
    urls: str                # shard URLs, brace-expanded by resolve_shards
    preprocess: Callable     # image transform (the model's training transform)
    tokenizer: Callable
    batch_size: int          # per rank
    num_samples: int         # per epoch, all ranks
    seed: int = 0
    workers: int = 1
    rank: int = 0
    world_size: int = 1
    resampled: bool = False  # shards drawn with replacement
    accum_freq: int = 1
    features: Optional[object] = None  # --feature-cache: a feature_cache.FeatureLookup of the cached towers
    weights: Optional[str] = None      # --train-data-upsampling-factors: a weight per '::'-joined source
    csv: Optional[object] = None       # --dataset-type csv: a csv_source.CsvSource read instead of tar shards

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size, self.workers, self.accum_freq)


def shard_stages(s: StreamSettings, shards: list, epoch: int, offset: int) -> list:
    """The stream's first stages: the shards (or csv blocks) a worker reads in `epoch`, drawn with replacement
    (with --train-data-upsampling-factors, each with its source's weight: open_clip's ResampledShards2) or
    shuffled and split across ranks and workers."""
    workers_eff = max(1, s.workers)
    if s.resampled:
        return [ResampledShards2(
            shards if s.csv is not None else s.urls, weights=s.weights,
            deterministic=True, epoch=epoch - 1,  # ResampledShards2 increments before use
            worker_seed=functools.partial(_worker_seed, s.seed, s.rank, offset))]
    if len(shards) < workers_eff * s.world_size:
        raise UserError(f"{len(shards)} shards cannot feed {workers_eff} workers x {s.world_size} ranks: "
                        "write more shards, lower --workers, or use --dataset-resampled")
    return [
        wds.SimpleShardList(shards),
        detshuffle2(bufsize=SHARD_SHUFFLE_BUFFER, initial=SHARD_SHUFFLE_BUFFER, seed=s.seed, epoch=epoch - 1),
        functools.partial(_split_by_rank, rank=s.rank, world_size=s.world_size),
        functools.partial(_split_by_logical_worker, offset=offset),
    ]


def make_train_stream(settings: StreamSettings, epoch: int, skip_batches: int = 0, consumed: Optional[dict] = None,
                      bad: Optional[dict] = None) -> TrainStream:
    """One epoch of training batches (images, tokens, report) for this rank; see WorkerTracker.report.

    Epoch mode: shards are shuffled with (seed, epoch), split across ranks then workers, samples shuffled
    with a seeded buffer. Resampled mode: each worker draws shards with replacement from its own seed.
    Resuming: `skip_batches` batches of the epoch were taken; `consumed` and `bad` are the workers' positions and
    bad counts after them (StreamPosition); the stream continues exactly there. Without `consumed`, each worker
    skips its share of the batches, which is exact when no sample was bad.
    """
    s = settings
    shards = s.csv.blocks if s.csv is not None else resolve_shards(s.urls, allow_missing=True)
    workers_eff = max(1, s.workers)
    offset = skip_batches % workers_eff
    if consumed is None:
        consumed = {w: n * s.batch_size for w, n in batches_per_worker_done(skip_batches, s.workers).items()}
    pipeline = shard_stages(s, shards, epoch, offset)
    tracker = WorkerTracker(offset, consumed, bad)
    pipeline += [
        s.csv.samples if s.csv is not None else functools.partial(tarfile_to_samples_nothrow, handler=tracker),
        detshuffle2(bufsize=SAMPLE_SHUFFLE_BUFFER, initial=SAMPLE_SHUFFLE_INITIAL, seed=s.seed + 7919 * s.rank,
                    epoch=epoch - 1),
        tracker.skip_and_count,
        functools.partial(decode_samples, tracker=tracker, preprocess=s.preprocess, tokenizer=s.tokenizer,
                          seed=s.seed, epoch=epoch, features=s.features),
        wds.batched(s.batch_size, partial=False),
        wds.map(functools.partial(_with_report, tracker=tracker)),
    ]
    dataset = EpochPipeline(*pipeline, tracker=tracker)

    num_batches = s.batches_per_epoch
    dataset = dataset.with_epoch(num_batches // workers_eff)
    # seeds the workers' torch RNG (augmentations) from (seed, epoch, rank), not from the trainer's RNG state
    generator = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch * 1009 + s.rank)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=s.workers,
                           persistent_workers=False, generator=generator)
    return TrainStream(loader=loader, num_batches=num_batches, num_samples=num_batches * s.batch_size * s.world_size)
