"""Embed a collection of images or texts with a (Matryoshka) CLIP model into one file for mrl_clip.search.

    python -m mrl_clip embed --model local-dir:runs/demo/mrl/export --images photos/ --output photos.npz
    python -m mrl_clip embed --model local-dir:runs/demo/mrl/export --texts captions.txt --output captions.npz

--images takes a folder (every image file under it, sorted by path) or a .txt list of image paths (relative paths
are read from the list's folder); --texts a file with one text a line. The output .npz holds `embeddings`
[items, width] (full width, L2-normalised; prefixes are re-normalised at search time), `items` (the paths or
texts) and `meta` (JSON: model, checkpoint, kind, width, dim, precision, and "nesting": the model's nesting record,
{} for none, which `search` reads to warn about untrained dims; mrl_clip.nesting).

--dim M --precision P stores only what a vector database needs: the re-normalised M-d prefix (slice, then
L2-normalise) at precision float32, float16, int8 or binary (mrl_clip.quantize). int8: `embeddings` holds int8
codes (faiss QT_8bit code - 128) and `ranges` [2, M] the per-dim min and max of these prefixes it was calibrated on
(decode: min + (code + 128.5) / 255 * (max - min)); binary: the sign bits packed with np.packbits along each row,
ceil(M/8) bytes, the last byte padded with zero bits. mrl_clip.search reads all of them.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import models, nesting, quantize
from ..adaptor import adaptor_identity
from ..errors import ArgumentParser, UserError, not_a_command
from ..files import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        images = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        images = [line if Path(line).is_absolute() else str(path.parent / line) for line in lines]
        missing = [p for p in images if not Path(p).is_file()]
        if missing:
            raise UserError(f"{len(missing)} image(s) listed in {source} not found, first: {missing[0]}")
    else:
        raise UserError(f"--images: no such folder or list file: {source}")
    if not images:
        raise UserError(f"--images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    return images


def list_texts(source: str) -> list[str]:
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--texts: file not found: {source}")
    texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise UserError(f"--texts: {source} holds no text")
    return texts


class ImageFiles(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.paths[i]) as image:
                return self.transform(image)
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"cannot read image {self.paths[i]}: {err}") from None


@torch.no_grad()
def embed_images(model, preprocess, paths, device="cpu", batch_size=256, workers=0) -> torch.Tensor:
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=workers)
    return torch.cat([model.encode_image(batch.to(device)).float().cpu()
                      for batch in tqdm(loader, desc="embedding images", unit="batch", leave=False)])


@torch.no_grad()
def embed_texts(model, tokenizer, texts, device="cpu", batch_size=256) -> torch.Tensor:
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    return torch.cat([model.encode_text(tokenizer(batch).to(device)).float().cpu()
                      for batch in tqdm(batches, desc="embedding texts", unit="batch", leave=False)])


def save_embeddings(path, embeddings: torch.Tensor, items: list, meta: dict, dtype="float32", dim=None,
                    precision=None, ranges=None) -> None:
    """Write full-width L2-normalised embeddings (dtype float32 or float16), or with dim / precision the
    re-normalised dim-prefixes at that precision (mrl_clip.quantize.prefix_codes; int8 calibrated on these
    embeddings unless ranges are given) and, for int8, the ranges."""
    precision = quantize.check_precision(precision or dtype, "--precision")
    embeddings = embeddings.float().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    width = embeddings.shape[1]
    codes, ranges = quantize.prefix_codes(embeddings, dim or width, precision, ranges)
    meta = {**meta, "count": len(items), "width": width, "dim": dim or width, "precision": precision,
            "dtype": str(codes.dtype), "normalised": "full width" if (dim or width) == width else "prefix"}
    if precision == "binary":
        meta["packing"] = "np.packbits along each row (first dim in the high bit), zero bits padding the last byte"
    arrays = {"embeddings": codes, "items": np.array(items, dtype=str), "meta": np.array(json.dumps(meta))}
    if ranges is not None:
        arrays["ranges"] = ranges

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


@dataclass
class EmbeddingsFile:
    codes: np.ndarray           # float32/float16 [items, dim], int8 [items, dim] or packed bits [items, ceil(dim/8)]
    items: list
    meta: dict
    precision: str
    dim: int                    # the stored prefix's dim
    width: int                  # the model's full embedding width
    ranges: np.ndarray | None = None   # int8: [2, dim] min and max per dim


def read_embeddings(path) -> EmbeddingsFile:
    """Any file written by save_embeddings (files from before --dim/--precision too)."""
    if not Path(path).is_file():
        raise UserError(f"embeddings file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            codes, items, meta = data["embeddings"], [str(x) for x in data["items"]], json.loads(str(data["meta"]))
            ranges = data.get("ranges")
        precision = quantize.check_precision(meta.get("precision", str(codes.dtype)), "the file's precision")
        dim = int(meta.get("dim", codes.shape[1]))
        stored = (2, dim) if precision == "int8" else None
        if codes.ndim != 2 or (stored and (ranges is None or ranges.shape != stored)):
            raise ValueError("codes or int8 ranges of the wrong shape")
    except (OSError, ValueError, KeyError, UserError) as err:
        raise UserError(f"{path} is not an embeddings file written by `mrl_clip embed` ({err})") from None
    return EmbeddingsFile(codes, items, meta, precision, dim, int(meta.get("width", dim)), ranges)


def load_embeddings(path) -> tuple:
    """(embeddings [items, dim], items list, meta dict) of a float32 or float16 file written by save_embeddings."""
    stored = read_embeddings(path)
    if stored.precision not in ("float32", "float16"):
        raise UserError(f"{path} holds {stored.precision} codes, not float embeddings")
    return stored.codes, stored.items, stored.meta


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip embed", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip model name or local-dir:PATH")
    p.add_argument("--pretrained", default=None, help="checkpoint file (not needed with local-dir:)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images, or a .txt list of image paths")
    source.add_argument("--texts", help="a text file, one text a line")
    p.add_argument("--output", required=True, help="the .npz file to write")
    p.add_argument("--dim", type=int, default=None, help="store the re-normalised prefix of this dim (default: full)")
    p.add_argument("--precision", default=None, help=f"one of {', '.join(quantize.PRECISIONS)} (default float32)")
    p.add_argument("--dtype", choices=["float32", "float16"], default=None, help="the same as --precision, kept for "
                   "older commands")
    p.add_argument("--adaptor", default=None, help="a Matryoshka adaptor file (python -m mrl_clip adapt) the "
                   "embeddings go through before they are stored")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.dtype and args.precision and args.dtype != args.precision:
        raise UserError(f"--dtype {args.dtype} and --precision {args.precision} disagree: give --precision only")
    args.precision = quantize.check_precision(args.precision or args.dtype or "float32")
    if args.dim is not None and args.dim < 1:
        raise UserError("--dim must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    items = list_images(args.images) if args.images else list_texts(args.texts)
    width = models.embed_width(args.model)
    if args.dim is not None and args.dim > width:
        raise UserError(f"--dim {args.dim} is above the embedding width {width} of {args.model}")
    model, _, preprocess, tokenizer = models.create(args.model, args.pretrained, device=args.device,
                                                    adaptor=args.adaptor)
    model.eval()
    record = nesting.of_model(args.model, args.pretrained, args.adaptor)
    nesting.warn(args.model, record, width, [args.dim or width])
    if args.images:
        embeddings = embed_images(model, preprocess, items, args.device, args.batch_size, args.workers)
    else:
        embeddings = embed_texts(model, tokenizer, items, args.device, args.batch_size)
    meta = {"model": args.model, "pretrained": args.pretrained, "kind": "images" if args.images else "texts",
            "adaptor": adaptor_identity(args.adaptor), "nesting": record}
    dim = args.dim or embeddings.shape[1]
    save_embeddings(args.output, embeddings, items, meta, dim=dim, precision=args.precision)
    print(f"wrote {len(items)} {meta['kind']} x {dim} dims ({args.precision}, "
          f"{quantize.bytes_per_vector(args.precision, dim)} bytes each) to {args.output}")
    return 0


if __name__ == "__main__":
    not_a_command("embed")
