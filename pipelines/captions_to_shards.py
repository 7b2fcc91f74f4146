"""Your own image-caption pairs -> WebDataset training shards (+ sizes.json), ready for mrl_clip.train.

    python -m pipelines.captions_to_shards --input pairs.csv --out shards/ [--prefix train] [--shard-size 10000]

--input is a CSV (header row; columns --image-key, --caption-key; other columns ignored) or JSONL (one object a
line with those keys). Relative image paths are taken from the input file's folder. Image bytes are stored as they
are (jpg, png, webp); decoding happens in the training loader, which skips and counts undecodable images.
"""
import csv
import json
import sys
from pathlib import Path

from mrl_clip.errors import ArgumentParser, UserError, run_cli
from pipelines.shards import brace_pattern, write_shards

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def read_rows(path: Path, image_key: str, caption_key: str):
    """(line number, image path, caption) from a CSV or JSONL file; a file that is not UTF-8 text, a CSV that
    does not parse or a line that is not a JSON object is a UserError naming the line."""
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    number = 0
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix.lower() in (".jsonl", ".json"):
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}:{number}: expected a JSON object")
                    yield number, row.get(image_key), row.get(caption_key)
            else:
                reader = csv.DictReader(f)
                for key in (image_key, caption_key):
                    if reader.fieldnames is None or key not in reader.fieldnames:
                        raise UserError(f"{path}: no column {key!r} (columns: {reader.fieldnames})")
                for row in reader:
                    number = reader.line_num
                    yield number, row.get(image_key), row.get(caption_key)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except csv.Error as err:
        raise UserError(f"{path}:{number + 1}: not valid CSV ({err})") from None


def checked_pairs(path: Path, image_key: str, caption_key: str) -> list:
    """Every row checked (image file present, known type, a caption that is not empty) before anything is
    written."""
    pairs = []
    for number, image, caption in read_rows(path, image_key, caption_key):
        if not image or caption is None:
            raise UserError(f"{path}:{number}: missing {image_key!r} or {caption_key!r}")
        if not isinstance(image, str) or not isinstance(caption, str):
            raise UserError(f"{path}:{number}: {image_key!r} and {caption_key!r} must be strings")
        if not caption.strip():
            raise UserError(f"{path}:{number}: empty caption")
        image_path = Path(image)
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        extension = IMAGE_EXTENSIONS.get(image_path.suffix.lower())
        if extension is None:
            raise UserError(f"{path}:{number}: {image_path.name} is not a jpg, png or webp file")
        if not image_path.is_file():
            raise UserError(f"{path}:{number}: image not found: {image_path}")
        pairs.append((f"{number:09d}", extension, image_path, caption))
    return pairs


def pair_samples(pairs):
    for key, extension, image_path, caption in pairs:
        yield {"__key__": key, extension: image_path.read_bytes(), "txt": caption}


def main(argv=None):
    parser = ArgumentParser(prog="python -m pipelines.captions_to_shards", description=__doc__)
    parser.add_argument("--input", required=True, type=Path, help="CSV or JSONL of image path + caption rows")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--image-key", default="image")
    parser.add_argument("--caption-key", default="caption")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    pairs = checked_pairs(args.input, args.image_key, args.caption_key)
    sizes = write_shards(pair_samples(pairs), args.out, args.prefix, args.shard_size, total=len(pairs))
    if not sizes:
        raise UserError(f"{args.input} holds no rows")
    print(f"{sum(sizes.values())} pairs in {len(sizes)} shards: {brace_pattern(args.out, args.prefix, len(sizes))}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
