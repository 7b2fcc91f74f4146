"""Fashion-MNIST (Debian's dataset-fashion-mnist) -> caption shards for training and a CLIP_benchmark folder.

    python -m pipelines.fashion_mnist --out runs/demo/data

writes OUT/train-0000.tar ... (image + caption, several caption templates per class) with sizes.json, and
OUT/fashion_mnist_test/ in CLIP_benchmark's wds layout (classnames.txt, zeroshot_classification_templates.txt,
test/nshards.txt, test/0.tar with png + cls; a train/ split of the first training images for linear probes),
readable by `clip_benchmark eval --dataset wds/fashion_mnist_test --dataset_root OUT/fashion_mnist_test`, and
OUT/fashion_mnist_captions/, a CLIP_benchmark retrieval folder (dataset_type.txt, image + txt captions).
"""
import argparse
import gzip
import random
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mrl_clip.errors import ArgumentParser, UserError, run_cli
from pipelines.shards import brace_pattern, png_bytes, write_retrieval_folder, write_shards

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"

CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CAPTION_TEMPLATES = [
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a grayscale image of a {c}.",
    "a close-up photo of a {c}.",
    "a {c}.",
]
ZEROSHOT_TEMPLATES = ["a photo of a {c}.", "a black and white photo of a {c}.", "a low resolution photo of a {c}."]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images, labels = source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            raise UserError(f"Fashion-MNIST not found at {path}; install it with: {INSTALL_HINT}")
    return read_idx(images), read_idx(labels)


def caption_samples(images: np.ndarray, labels: np.ndarray, seed: int):
    rng = random.Random(seed)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        caption = rng.choice(CAPTION_TEMPLATES).format(c=CLASSNAMES[int(label)])
        yield {"__key__": f"fmnist{i:06d}", "png": png_bytes(Image.fromarray(pixels)), "txt": caption}


class LabelledImages:
    """(PIL image, label) pairs with .classes/.templates, as clip_benchmark's convert_dataset expects."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.classes, self.templates = CLASSNAMES, ZEROSHOT_TEMPLATES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), int(self.labels[i])


def build_train_shards(source: Path, out: Path, shard_size: int, limit=None, seed: int = 0) -> str:
    images, labels = load_split(source, "train")
    if limit:
        images, labels = images[:limit], labels[:limit]
    sizes = write_shards(caption_samples(images, labels, seed), out, "train", shard_size, total=len(labels))
    return brace_pattern(out, "train", len(sizes))


def build_eval_folder(source: Path, folder: Path, limit=None, train_limit=0) -> Path:
    """CLIP_benchmark classification folder: the test split, and (train_limit > 0) the first train_limit training
    images as a train split for linear probes."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    splits = [("test", limit)] + ([("train", train_limit)] if train_limit else [])
    for split, count in splits:
        images, labels = load_split(source, split)
        if count:
            images, labels = images[:count], labels[:count]
        convert_dataset(LabelledImages(images, labels), split, str(tmp), transform=PIL_to_bytes("png"),
                        image_format="png", verbose=False)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build_retrieval_folder(source: Path, folder: Path, per_class: int = 100, captions: int = 2, seed: int = 0):
    """CLIP_benchmark retrieval folder from the test split: per_class images of each class, each with `captions`
    distinct caption templates of its class. The captions name the class only, so same-class images tie: a
    caption's one positive image shares its class with per_class - 1 others, which caps recall@K near K/per_class."""
    images, labels = load_split(source, "test")
    rng = random.Random(seed)
    chosen = [i for c in range(len(CLASSNAMES)) for i in np.flatnonzero(labels == c)[:per_class]]
    pairs = [(Image.fromarray(images[i]), [t.format(c=CLASSNAMES[int(labels[i])])
                                          for t in rng.sample(CAPTION_TEMPLATES, captions)]) for i in chosen]
    return write_retrieval_folder(pairs, folder)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR, help="folder with the IDX .gz files")
    parser.add_argument("--shard-size", type=int, default=6000)
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--probe-train-limit", type=int, default=10000,
                        help="training images in the eval folder's train split (for linear probes; 0: none)")
    parser.add_argument("--retrieval-per-class", type=int, default=100,
                        help="test images per class in the retrieval folder (0: no retrieval folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the caption template choice")
    args = parser.parse_args(argv)
    pattern = build_train_shards(args.source, args.out, args.shard_size, args.train_limit, args.seed)
    folder = build_eval_folder(args.source, args.out / "fashion_mnist_test", args.test_limit,
                               args.probe_train_limit)
    print(f"train shards: {pattern}\neval folder:  {folder}")
    if args.retrieval_per_class:
        captions = build_retrieval_folder(args.source, args.out / "fashion_mnist_captions", args.retrieval_per_class)
        print(f"retrieval folder: {captions}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
