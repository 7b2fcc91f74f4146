"""Embed a collection of images or texts with a (Matryoshka) CLIP model into one file for mrl_clip.search.

    python -m mrl_clip.embed --model local-dir:runs/demo/mrl/export --images photos/ --output photos.npz
    python -m mrl_clip.embed --model local-dir:runs/demo/mrl/export --texts captions.txt --output captions.npz

--images takes a folder (every image file under it, sorted by path) or a .txt list of image paths (relative paths
are read from the list's folder); --texts a file with one text a line. The output .npz holds `embeddings`
[items, width] (full width, L2-normalised; prefixes are re-normalised at search time), `items` (the paths or
texts) and `meta` (JSON: model, checkpoint, kind, width, dtype).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import models
from ..errors import ArgumentParser, UserError, run_cli
from ..files import atomic_write
from .index import STORAGE_DTYPES

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


def save_embeddings(path, embeddings: torch.Tensor, items: list, meta: dict, dtype="float32") -> None:
    vectors = F.normalize(embeddings.float(), dim=-1).numpy().astype(dtype)
    meta = {**meta, "count": len(items), "width": vectors.shape[1], "dtype": dtype, "normalised": "full width"}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz" to the temporary name
            np.savez(f, embeddings=vectors, items=np.array(items, dtype=str), meta=np.array(json.dumps(meta)))

    atomic_write(path, write)


def load_embeddings(path) -> tuple:
    """(embeddings [items, width], items list, meta dict) from a file written by save_embeddings."""
    if not Path(path).is_file():
        raise UserError(f"embeddings file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["embeddings"], [str(x) for x in data["items"]], json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path} is not an embeddings file written by mrl_clip.embed ({err})") from None


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip.embed", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip model name or local-dir:PATH")
    p.add_argument("--pretrained", default=None, help="checkpoint file (not needed with local-dir:)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images, or a .txt list of image paths")
    source.add_argument("--texts", help="a text file, one text a line")
    p.add_argument("--output", required=True, help="the .npz file to write")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32", help="storage type of the embeddings")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    items = list_images(args.images) if args.images else list_texts(args.texts)
    model, _, preprocess, tokenizer = models.create(args.model, args.pretrained, device=args.device)
    model.eval()
    if args.images:
        embeddings = embed_images(model, preprocess, items, args.device, args.batch_size, args.workers)
    else:
        embeddings = embed_texts(model, tokenizer, items, args.device, args.batch_size)
    meta = {"model": args.model, "pretrained": args.pretrained, "kind": "images" if args.images else "texts"}
    save_embeddings(args.output, embeddings, items, meta, args.dtype)
    print(f"wrote {len(items)} {meta['kind']} x {embeddings.shape[1]} dims ({args.dtype}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
