"""One index file: the normalised full-width embeddings, their items, and a stage-1 faiss index, built once.

    MRLCLIP-INDEX\\n                     magic line
    <manifest bytes>\\n                  decimal length of the manifest
    <manifest>                          JSON: format, count, width, dtype, meta, stage1 spec, faiss version, and
                                        for each section its offset (from the end of the manifest), size, crc32
    vectors | items | stage1            the sections: raw [count, width] rows, a JSON list, faiss.serialize_index

The file is written atomically (a temporary file renamed over the target); reading checks the total size (a
truncated copy) and each section's crc32 (a corrupt one) before faiss sees a byte, so a bad file is one error line.
"""
import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import UserError
from ..files import atomic_write
from .index import EmbeddingIndex
from .precision import check_precision

MAGIC = b"MRLCLIP-INDEX\n"
FORMAT = 1
_STAGE1 = re.compile(r"^(?:hnsw(\d+)(?:-(\w+))?@|(\w+)@)?(\d+)$")


@dataclass
class Stage1Spec:
    dim: int
    precision: str = "float32"
    hnsw: int = 0                 # links per node of an HNSW graph; 0: flat
    ef_construction: int = 40

    def label(self) -> str:
        kind = f"hnsw{self.hnsw}" if self.hnsw else ""
        if self.precision != "float32":
            kind = f"{kind}-{self.precision}" if kind else self.precision
        return f"{kind}@{self.dim}" if kind else str(self.dim)


def parse_stage1(text: str, width: int | None = None, flag: str = "--stage1") -> Stage1Spec:
    """'32' (flat float32), 'binary@256', 'hnsw32@32' (HNSW, float32), 'hnsw32-int8@64'."""
    match = _STAGE1.match(text.strip())
    if not match:
        raise UserError(f"{flag} takes [hnswM-][PRECISION@]DIM or hnswM@DIM (e.g. 32, binary@256, hnsw32@32, "
                        f"hnsw32-int8@64), got {text!r}")
    links, hnsw_precision, flat_precision, dim = match.groups()
    spec = Stage1Spec(int(dim), hnsw_precision or flat_precision or "float32", int(links or 0))
    check_precision(spec.precision, spec.dim, flag)
    if links is not None and spec.hnsw < 2:
        raise UserError(f"{flag}: an HNSW graph needs at least 2 links per node, got {text!r}")
    if not 1 <= spec.dim <= (width or spec.dim):
        raise UserError(f"{flag} dim {spec.dim} is outside 1..{width} (the embedding width)")
    return spec


def build_index(index: EmbeddingIndex, spec: Stage1Spec):
    """The stage-1 faiss index of spec over index's rows (None for flat float32: that is the prefix itself)."""
    return index.build_stage1(spec.dim, spec.precision, spec.hnsw, spec.ef_construction)


def attach(index: EmbeddingIndex, spec: Stage1Spec, stage1) -> None:
    if stage1 is not None:
        (index.graphs if spec.hnsw else index.coded)[(spec.precision, spec.dim)] = stage1


def save_index(path, index: EmbeddingIndex, items: list, meta: dict, spec: Stage1Spec, stage1) -> int:
    """Write one index file (atomically); returns its size in bytes."""
    if spec.precision == "binary":
        stage1_bytes = faiss.serialize_index_binary(stage1)
    else:
        stage1_bytes = faiss.serialize_index(stage1) if stage1 is not None else np.zeros(0, np.uint8)
    sections = {"vectors": np.ascontiguousarray(index.vectors).view(np.uint8).reshape(-1),
                "items": np.frombuffer(json.dumps(items).encode(), np.uint8),
                "stage1": stage1_bytes}
    offset, table = 0, []
    for name, data in sections.items():
        table.append({"name": name, "offset": offset, "nbytes": int(data.nbytes), "crc32": zlib.crc32(data)})
        offset += data.nbytes
    manifest = json.dumps({"format": FORMAT, "count": len(index), "width": index.width,
                           "dtype": str(index.vectors.dtype), "meta": meta, "stage1": asdict(spec),
                           "faiss": faiss.__version__, "sections": table}).encode()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(MAGIC + f"{len(manifest)}\n".encode() + manifest)
            for data in sections.values():
                f.write(memoryview(data))

    atomic_write(path, write)
    return Path(path).stat().st_size


def is_index_file(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_manifest(f, path) -> tuple:
    """(manifest, offset of the first section) from an open index file, or a UserError."""
    if f.read(len(MAGIC)) != MAGIC:
        raise UserError(f"{path} is not an index file written by `mrl_clip index build`")
    try:
        length = int(f.readline(32))
        manifest = json.loads(f.read(length))
        sections = {s["name"]: s for s in manifest["sections"]}
        assert set(sections) == {"vectors", "items", "stage1"} and manifest["format"] == FORMAT
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise UserError(f"{path}: the index file's manifest is damaged (or from another version)") from None
    return manifest, f.tell()


def load_index(path) -> tuple:
    """(EmbeddingIndex with its stage-1 index attached, items, meta, Stage1Spec) from an index file."""
    if not Path(path).is_file():
        raise UserError(f"index file not found: {path}")
    with open(path, "rb") as f:
        manifest, start = read_manifest(f, path)
        sections = {s["name"]: s for s in manifest["sections"]}
        expected = start + sum(s["nbytes"] for s in sections.values())
        actual = Path(path).stat().st_size
        if actual != expected:
            raise UserError(f"{path} is {actual} bytes but its manifest describes {expected}: truncated or damaged;"
                            " rebuild it with `python -m mrl_clip index build`")
        data = {}
        for name, section in sections.items():
            f.seek(start + section["offset"])
            data[name] = np.fromfile(f, np.uint8, section["nbytes"])
            if zlib.crc32(data[name]) != section["crc32"]:
                raise UserError(f"{path}: the {name} section fails its checksum (the file is corrupt); rebuild it "
                                "with `python -m mrl_clip index build`")
    vectors = data["vectors"].view(manifest["dtype"]).reshape(manifest["count"], manifest["width"])
    index = EmbeddingIndex(vectors, manifest["dtype"], normalized=True)
    spec = Stage1Spec(**manifest["stage1"])
    if spec.precision == "binary":
        attach(index, spec, faiss.deserialize_index_binary(data["stage1"]))
    elif len(data["stage1"]):
        attach(index, spec, faiss.deserialize_index(data["stage1"]))
    return index, json.loads(data["items"].tobytes()), manifest["meta"], spec
