"""--feature-cache DIR: the trunk outputs of fully locked towers (locked_towers.Trunk), computed once per sample,
stored, memory-mapped, and read by the training stream in place of decoding, transforming and encoding.

Key: a folder per tower, DIR/<tower>-<kind>-<digest>, the digest (blake2b) of everything that decides a feature:
the cache format, the model config, the trunk's weights and buffers (their own digest), the transform (the
validation transform's repr, or the tokenizer and context length), the precision and the weights' dtype. A changed
key is another folder: a miss, never a stale hit. key.json in the folder spells the key out.

Layout: per shard, NAME-SIZE-MTIME_NS.npy (float32 [samples, width]: the trunk's outputs, in the shard's order,
bad samples left out) and NAME-SIZE-MTIME_NS.json (the keys, the bad samples' messages, the dtype the trunk
gave, the .npy's size and blake2b). A shard's .json is written last, each file to a temporary name renamed into
place (files.atomic_write): a killed or failed build leaves finished shards whole and the others absent, and a
build resumes with the shards not yet there. A shard whose files do not match (truncated, corrupt) is rebuilt,
with a warning. Disk per sample: 4 bytes x width (+ its key in the .json): 5120 B for a tf_efficientnet_lite0
trunk (1280), 1536 B for MiniLM's pooled output (384).
"""
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..files import atomic_write, remove_partial_files
from .locked_towers import IMAGE, Trunk
from .stream import IMAGE_KEYS, BadSample, decode_image, sample_caption, sample_name, tarfile_to_samples_nothrow, \
    transform_failed

FORMAT = "mrl_clip.feature_cache 1"
DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


def weights_digest(trunk: Trunk) -> str:
    h = hashlib.blake2b(digest_size=16)
    for i, module in enumerate(trunk.modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def transform_record(trunk: Trunk, preprocess, tokenizer) -> str:
    """The image transform's repr (function addresses dropped) or the tokenizer's class and context length."""
    if trunk.tower == IMAGE:
        return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))
    return f"{type(tokenizer).__name__} context_length={getattr(tokenizer, 'context_length', None)}"


def cache_key(trunk: Trunk, model_cfg: dict, preprocess, tokenizer, precision: str) -> dict:
    dtype = next((p.dtype for m in trunk.modules for p in m.parameters()), torch.float32)
    return {"format": FORMAT, "tower": trunk.tower, "kind": trunk.kind, "model_cfg": model_cfg,
            "weights": weights_digest(trunk), "transform": transform_record(trunk, preprocess, tokenizer),
            "precision": precision, "weights_dtype": str(dtype)}


def key_folder(root: Path, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True, default=str)
    return Path(root) / f"{key['tower']}-{key['kind']}-{hashlib.blake2b(text.encode(), digest_size=10).hexdigest()}"


def shard_stem(url: str) -> str:
    st = os.stat(url)
    return f"{os.path.basename(url)}-{st.st_size}-{st.st_mtime_ns}"


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardFeatures:
    """One shard's stored features: where, which row each key is, why each bad sample was bad."""
    path: str
    rows: dict
    bad: dict
    dtype: str


def read_shard(folder: Path, stem: str) -> tuple[Optional[ShardFeatures], Optional[str]]:
    """(the shard's features, None), or (None, why not): absent, or a file that does not match its record."""
    meta_path, npy_path = folder / f"{stem}.json", folder / f"{stem}.npy"
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text())
        if not npy_path.is_file() or npy_path.stat().st_size != meta["npy_bytes"]:
            return None, f"{npy_path} is missing or truncated"
        if file_digest(npy_path) != meta["npy_digest"]:
            return None, f"{npy_path} is corrupt (its digest does not match)"
        array = np.load(npy_path, mmap_mode="r")
        if array.shape[0] != len(meta["keys"]) or meta["dtype"] not in DTYPES:
            return None, f"{npy_path} does not match {meta_path.name}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{meta_path} is unreadable ({type(err).__name__})"
    return ShardFeatures(str(npy_path), {k: i for i, k in enumerate(meta["keys"])}, meta["bad"], meta["dtype"]), None


def write_shard(folder: Path, stem: str, features: np.ndarray, keys: list, bad: dict, dtype: str) -> None:
    """The .npy, then the .json that completes it, each atomically (a full disk: atomic_write's one line)."""
    npy_path = folder / f"{stem}.npy"
    atomic_write(npy_path, lambda tmp: _save_npy(tmp, features))
    meta = {"keys": keys, "bad": bad, "dtype": dtype, "npy_bytes": npy_path.stat().st_size,
            "npy_digest": file_digest(npy_path)}
    atomic_write(folder / f"{stem}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


@dataclass
class Builder:
    """What computing one tower's features needs."""
    trunk: Trunk
    preprocess: object      # the image transform (deterministic)
    tokenizer: object
    batch_size: int
    device: str
    autocast: object
    input_dtype: torch.dtype = torch.float32

    def inputs(self, sample):
        """The trunk's input for one sample; None for one the stream rejects before looking features up (no image,
        no usable caption); BadSample for one it skips as bad at this tower (undecodable, the transform failed)."""
        where = sample_name(sample)
        try:
            text, image_key = sample_caption(sample, where)
        except BadSample:
            return None
        try:
            if self.trunk.tower == IMAGE:
                return self.preprocess(decode_image(sample, where, image_key))
            return self.tokenizer(text)[0]
        except BadSample:
            raise
        except Exception as err:
            raise transform_failed(where, err) from None

    @torch.no_grad()
    def encode(self, batch: list) -> torch.Tensor:
        x = torch.stack(batch).to(self.device)
        if x.is_floating_point():
            x = x.to(self.input_dtype)
        with self.autocast():
            return self.trunk.encode(x)


def image_digest(builder: Builder, sample) -> Optional[bytes]:
    """The digest of an image tower's input bytes (None for a text tower or a sample without an image): samples
    with the same image bytes get the same feature, as the transform is deterministic and the trunk in eval mode."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if builder.trunk.tower != IMAGE or image_key is None:
        return None
    return hashlib.blake2b(sample[image_key], digest_size=16).digest()


def mapped_row(arrays: dict, path: str, i: int) -> np.ndarray:
    """Row i of the .npy at `path`, through `arrays` (path -> its memory map, opened once)."""
    if path not in arrays:
        arrays[path] = np.load(path, mmap_mode="r")
    return np.array(arrays[path][i])


@dataclass
class SeenImages:
    """Images a build encoded in its earlier shards: digest -> (that shard's .npy, row), up to `limit` of them.
    Data sets with several captions an image write one caption a pass, a pass a shard (OpenMoji: 4 passes), so
    each image comes back in every pass's shard; its row is copied, not encoded again."""
    limit: int = 1_000_000
    where: dict = field(default_factory=dict)
    dtype: str = "torch.float32"    # the trunk's output dtype, which the rows are stored from
    _arrays: dict = field(default_factory=dict, repr=False)

    def row(self, digest: Optional[bytes]) -> Optional[np.ndarray]:
        path, i = self.where.get(digest, (None, None))
        return None if path is None else mapped_row(self._arrays, path, i)

    def add(self, npy_path: Path, keys: list, digests: dict, dtype: str) -> None:
        self.dtype = dtype
        for i, key in enumerate(keys):
            digest = digests.get(key)
            if digest is not None and digest not in self.where and len(self.where) < self.limit:
                self.where[digest] = (str(npy_path), i)


def build_shard(builder: Builder, url: str, seen: Optional[SeenImages] = None):
    """(features, keys, bad {key: message}, dtype, digests {key: image digest}) of one shard, in batches through the
    trunk. A sample without an image or caption is left out and not recorded: the stream finds that itself before
    looking features up. An image seen before in the shard (OpenMoji: one image, several captions) is encoded once
    and its row repeated; one seen in an earlier shard of the build (`seen`) has its row copied from there."""
    keys, bad, batch, batch_keys, parts = [], {}, [], [], []
    encoded, digests = {}, {}   # image digest -> key of the sample encoded with it; key -> its image's digest
    repeats, copied = [], []    # (key, key of the sample whose row it repeats); (key, row from an earlier shard)
    dtype = seen.dtype if seen is not None else "torch.float32"

    def flush():
        nonlocal dtype
        out = builder.encode(batch)
        dtype = str(out.dtype)
        parts.append(out.float().cpu().numpy())
        keys.extend(batch_keys)
        batch.clear()
        batch_keys.clear()

    for sample in tarfile_to_samples_nothrow([{"url": url}], handler=lambda exn: True):
        key, digest = sample["__key__"], image_digest(builder, sample)
        earlier = seen.row(digest) if seen is not None and digest not in encoded else None
        if digest in encoded or earlier is not None:
            try:
                sample_caption(sample, sample_name(sample))  # the stream reads it only with a usable caption
            except BadSample:
                continue
            digests[key] = digest
            if earlier is None:
                repeats.append((key, encoded[digest]))
            else:
                copied.append((key, earlier))
            continue
        try:
            x = builder.inputs(sample)
        except BadSample as err:
            bad[key] = str(err)
            continue
        if x is None:
            continue
        if digest is not None:
            encoded[digest], digests[key] = key, digest
        batch.append(x)
        batch_keys.append(key)
        if len(batch) == builder.batch_size:
            flush()
    if batch:
        flush()
    width = parts[0].shape[1:] if parts else copied[0][1].shape if copied else (0,)
    features = np.concatenate(parts) if parts else np.zeros((0, *width), np.float32)
    if repeats:
        row = {key: i for i, key in enumerate(keys)}
        features = np.concatenate([features, features[[row[source] for _, source in repeats]]])
        keys += [key for key, _ in repeats]
    if copied:
        features = np.concatenate([features, np.stack([row for _, row in copied])])
        keys += [key for key, _ in copied]
    return features, keys, bad, dtype, digests


@dataclass
class FeatureLookup:
    """The cached towers' features by shard URL (picklable into loader workers, which memory-map the files)."""
    shards: dict = field(default_factory=dict)   # tower -> {url: ShardFeatures}
    _arrays: dict = field(default_factory=dict, repr=False)

    def __getstate__(self):
        return {"shards": self.shards, "_arrays": {}}

    def has(self, tower: str) -> bool:
        return tower in self.shards

    def get(self, tower: str, sample, where: str) -> torch.Tensor:
        entry = self.shards[tower].get(sample.get("__url__"))
        key = sample.get("__key__")
        if entry is not None and key in entry.bad:
            raise BadSample(entry.bad[key])
        if entry is None or key not in entry.rows:
            raise BadSample(f"{where}: not in the feature cache (the shard changed after the cache was built?)")
        row = mapped_row(self._arrays, entry.path, entry.rows[key])
        return torch.from_numpy(row).to(DTYPES[entry.dtype])


def local_shards(urls: list) -> list:
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise UserError(f"--feature-cache reads local shards only: {remote[0]} is not one")
    return [u for u in urls if os.path.isfile(u)]


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--feature-cache {root} is not writable: {err.strerror or err}") from None


def prepare_tower(root: Path, key: dict, builder: Builder, shards: list, rank: int, world_size: int,
                  barrier) -> dict:
    """{url: ShardFeatures} of one tower: this rank builds its share (shards[rank::world_size]) of those missing,
    every rank waits, then reads them all."""
    folder = key_folder(root, key)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write(folder / "key.json", lambda tmp: Path(tmp).write_text(json.dumps(key, indent=1, default=str)))
        remove_partial_files(folder)  # left by a killed build; before any rank writes
    barrier()
    mine = shards[rank::world_size]
    todo = []
    for url in mine:
        found, problem = read_shard(folder, shard_stem(url))
        if problem:
            print(f"warning: feature cache: {problem}: rebuilding it", file=sys.stderr)
        if found is None:
            todo.append(url)
    print(f"feature cache {folder} (rank {rank}): {len(mine) - len(todo)} of {len(mine)} shards already built",
          file=sys.stderr)
    if todo:
        build_shards(folder, builder, todo, rank)
    barrier()
    return read_all(folder, shards)


def build_shards(folder: Path, builder: Builder, todo: list, rank: int) -> None:
    kill_after = int(os.environ.get("MRL_CLIP_TEST_KILL_BUILD_AFTER", "0"))  # tests: a build killed for real
    seen = SeenImages()
    for done, url in enumerate(tqdm(todo, desc=f"feature cache ({builder.trunk.tower}, rank {rank})",
                                    unit="shard", dynamic_ncols=True)):
        if kill_after and done == kill_after:
            os.kill(os.getpid(), 9)
        features, keys, bad, dtype, digests = build_shard(builder, url, seen)
        stem = shard_stem(url)
        write_shard(folder, stem, features, keys, bad, dtype)
        seen.add(folder / f"{stem}.npy", keys, digests, dtype)


def read_all(folder: Path, shards: list) -> dict:
    found = {}
    for url in shards:
        entry, problem = read_shard(folder, shard_stem(url))
        if entry is None:
            raise UserError(f"feature cache: {problem or f'{url} has no features in {folder}'} (after the build; "
                            "is another run writing it?)")
        found[url] = entry
    return found


def add_flags(p) -> None:
    p.add_argument("--deterministic-towers", action="store_true",
                   help="train on the model's validation transform (resize + centre crop, open_clip's "
                        "preprocess_val) instead of its random one, and run fully locked towers' trunks in eval "
                        "mode (no dropout / drop-path): their output is then a function of the sample alone. "
                        "Recorded in the checkpoint; a resume must agree")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="with --deterministic-towers: compute the fully locked towers' trunk outputs once, store "
                        "them under DIR (shared by runs of the same key) and train the rest from them "
                        "(docs/training.md)")


def check_flags(args) -> None:
    if args.feature_cache and not args.deterministic_towers:
        raise UserError("--feature-cache needs --deterministic-towers: the training transform is random "
                        "(RandomResizedCrop) and locked towers run dropout, so a stored feature would not be what "
                        "the run computes")
    if args.feature_cache and not (args.lock_image or args.lock_text):
        raise UserError("--feature-cache: no tower is locked (--lock-image / --lock-text), so there is nothing to "
                        "cache")


def describe(trunks: list, refused: list, cached: bool) -> str:
    """The line the run logs for --deterministic-towers."""
    towers = ", ".join(f"{t.tower} ({t.kind})" for t in trunks) or "none"
    what = "cached from --feature-cache" if cached else "computed"
    extra = "".join(f"; not pinned: {r}" for r in refused)
    return (f"deterministic towers: the training transform is the validation transform; fully locked trunks in "
            f"eval mode: {towers}, {what}{extra}")


def prepare(args, trunks: list, model_cfg: dict, preprocess, tokenizer, autocast, input_dtype, precision: str,
            shards: list) -> FeatureLookup:
    """Every cached tower's features, built where missing (each rank its share), as the stream reads them."""
    import torch.distributed as dist

    root = Path(args.feature_cache)
    check_writable(root)
    shards = local_shards(shards)

    def barrier():
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
    lookup = FeatureLookup()
    for trunk in trunks:
        key = cache_key(trunk, model_cfg, preprocess, tokenizer, precision)
        builder = Builder(trunk, preprocess, tokenizer, args.batch_size, args.device, autocast, input_dtype)
        lookup.shards[trunk.tower] = prepare_tower(root, key, builder, shards, args.rank, args.world_size, barrier)
    return lookup
