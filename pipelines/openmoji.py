"""OpenMoji (npm `openmoji` 17.0.0: 4,495 colour SVG emoji, each annotated and tagged) -> captioned images for
image-text training, and a held-out split in CLIP_benchmark's retrieval layout.

    python -m pipelines.openmoji --out runs/demo/align/data/openmoji [--size 128] [--heldout 400]

Writes OUT/train-0000.tar ... (+ sizes.json; two samples per training emoji: "an emoji of {annotation}" and
"{annotation}: {up to 4 tags}"), OUT/heldout/ (a CLIP_benchmark retrieval folder: each held-out emoji with its
"an emoji of {annotation}" caption; `clip_benchmark eval --dataset wds/heldout --dataset_root OUT/heldout --task
zeroshot_retrieval` and `python -m mrl_clip.eval retrieval --data OUT/heldout` both read it) and OUT/split.json.

Kept: the emoji without a skin tone (a skin-tone variant is its base emoji recoloured, with the base's annotation
plus a tone word: a variant held out while its siblings train is a near-copy of a training pair), minus the 9
`component` swatches (skin tones and hair styles, no object): 2,456 emoji. The split is drawn by hash, not by
position: the `--heldout` emoji whose sha1(hexcode) sort first, among those whose annotation is unique (a caption
that names two images has no single right answer). Each image is rendered by resvg (PyPI resvg-py) on white.
The npm tarball (4.3 MB) is fetched once into --cache with `npm pack`; every part is built only when missing.
"""
import argparse
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mrl_clip.errors import ArgumentParser, UserError, run_cli
from mrl_clip.files import write_json
from pipelines.shards import brace_pattern, png_bytes, write_shards

VERSION = "17.0.0"
DEFAULT_CACHE = Path.home() / ".cache" / "mrl_clip" / "npm"
MAX_TAGS = 4


def fetch(cache: Path) -> Path:
    """The npm tarball of openmoji VERSION in `cache` (fetched with `npm pack` when missing)."""
    tarball = cache / f"openmoji-{VERSION}.tgz"
    if tarball.is_file():
        return tarball
    if shutil.which("npm") is None:
        raise UserError("npm not found: install Node.js's npm (Debian: apt-get install -y npm) to fetch openmoji")
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["npm", "pack", f"openmoji@{VERSION}", "--pack-destination", str(cache)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not tarball.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"npm pack openmoji@{VERSION} failed (is the npm registry reachable?): {last}")
    return tarball


def read_package(tarball: Path) -> tuple[list, dict]:
    """(openmoji.json's entries, {hexcode: colour SVG text}) from the npm tarball."""
    with tarfile.open(tarball) as tar:
        meta = json.loads(tar.extractfile("package/package.json").read())
        if meta.get("version") != VERSION:
            raise UserError(f"{tarball} holds openmoji {meta.get('version')}, not {VERSION}")
        entries = json.loads(tar.extractfile("package/data/openmoji.json").read())
        svgs = {Path(m.name).stem: tar.extractfile(m).read().decode()
                for m in tar.getmembers() if m.name.startswith("package/color/svg/") and m.name.endswith(".svg")}
    return entries, svgs


def kept_emoji(entries: list) -> list:
    return [e for e in entries if not e["skintone"] and e["group"] != "component"]


def annotation(entry: dict) -> str:
    text = entry["annotation"]
    return text.replace("-", " ") if entry["group"] == "extras-openmoji" else text  # its names are slugs


def tags(entry: dict) -> list:
    """Up to MAX_TAGS distinct tags (Unicode's, then OpenMoji's), leaving out words of the annotation itself."""
    words = set(annotation(entry).lower().split())
    seen = []
    for tag in (entry["tags"] + "," + entry["openmoji_tags"]).split(","):
        tag = tag.strip().lower()
        if tag and tag not in seen and tag not in words:
            seen.append(tag)
    return seen[:MAX_TAGS]


def captions(entry: dict) -> list:
    found = [f"an emoji of {annotation(entry)}"]
    return found + ([f"{annotation(entry)}: {', '.join(tags(entry))}"] if tags(entry) else [])


def split(emoji: list, heldout: int) -> tuple[list, list]:
    """(train, held-out): the `heldout` emoji with a unique annotation whose sha1(hexcode) sorts first."""
    counts = Counter(annotation(e).lower() for e in emoji)
    digest = lambda e: hashlib.sha1(e["hexcode"].encode()).hexdigest()  # noqa: E731
    candidates = sorted((e for e in emoji if counts[annotation(e).lower()] == 1), key=digest)
    if not 0 < heldout < len(candidates):
        raise UserError(f"--heldout must be between 1 and {len(candidates) - 1}, got {heldout}")
    held = {e["hexcode"] for e in candidates[:heldout]}
    return [e for e in emoji if e["hexcode"] not in held], [e for e in emoji if e["hexcode"] in held]


def render(job: tuple) -> bytes:
    """PNG bytes of one SVG, `size` px square, RGB on white."""
    import resvg_py

    svg, size = job
    png = resvg_py.svg_to_bytes(svg_string=svg, background="#ffffff", width=size, height=size,
                                skip_system_fonts=True)
    return png_bytes(Image.open(io.BytesIO(png)).convert("RGB"))


def render_all(emoji: list, svgs: dict, size: int, processes: int) -> dict:
    """{hexcode: PNG bytes}, rendered on `processes` processes with a progress bar."""
    jobs = [(svgs[e["hexcode"]], size) for e in emoji]
    with Pool(processes) as pool:
        pngs = list(tqdm(pool.imap(render, jobs, chunksize=16), total=len(jobs), desc="rendering OpenMoji",
                         unit="emoji"))
    return {e["hexcode"]: png for e, png in zip(emoji, pngs)}


def train_samples(train: list, pngs: dict, seed: int) -> list:
    """One sample per (emoji, caption), in a seeded shuffle so an emoji's two captions rarely share a batch."""
    samples = [{"__key__": f"{e['hexcode']}_{i}", "png": pngs[e["hexcode"]], "txt": caption}
               for e in train for i, caption in enumerate(captions(e))]
    random.Random(seed).shuffle(samples)
    return samples


def write_heldout(heldout: list, pngs: dict, folder: Path) -> Path:
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_retrieval_dataset

    pairs = [(Image.open(io.BytesIO(pngs[e["hexcode"]])), [captions(e)[0]]) for e in heldout]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_retrieval_dataset(pairs, "test", str(tmp), transform=PIL_to_bytes("png"), image_format="png",
                              verbose=False)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build(out: Path, size: int = 128, heldout: int = 400, cache: Path = DEFAULT_CACHE, limit=None,
          processes: int = 2, seed: int = 0) -> dict:
    """Shards, held-out folder and split.json under `out` (reused when split.json is there); returns
    {"train": shard pattern, "heldout": folder, "train_emoji", "heldout_emoji", "train_samples"}."""
    out = Path(out)
    record = out / "split.json"
    if record.is_file():
        made = json.loads(record.read_text())
        if made["size"] == size and made["heldout_emoji"] == heldout and made["limit"] == limit:
            return {**made, "heldout": out / "heldout"}
    if size < 16 or size > 1024:
        raise UserError(f"--size must be between 16 and 1024 pixels, got {size}")
    entries, svgs = read_package(fetch(Path(cache)))
    emoji = kept_emoji(entries)[:limit]
    train, held = split(emoji, heldout)
    pngs = render_all(emoji, svgs, size, processes)
    samples = train_samples(train, pngs, seed)
    sizes = write_shards(samples, out, "train", shard_size=1000, total=len(samples))
    write_heldout(held, pngs, out / "heldout")
    made = {"train": brace_pattern(out, "train", len(sizes)), "size": size, "limit": limit,
            "train_emoji": len(train), "heldout_emoji": len(held), "train_samples": len(samples),
            "rule": "emoji without skin tone or component group; held out: the first by sha1(hexcode) among "
                    "unique annotations", "heldout_hexcodes": sorted(e["hexcode"] for e in held)}
    write_json(made, record)
    return {**made, "heldout": out / "heldout"}


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--heldout", type=int, default=400, help="emoji held out for retrieval evaluation")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the npm tarball is kept")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N kept emoji (tests)")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    made = build(args.out, args.size, args.heldout, args.cache, args.limit, args.processes)
    print(f"train shards: {made['train']} ({made['train_emoji']} emoji, {made['train_samples']} samples)\n"
          f"held-out retrieval folder: {made['heldout']} ({made['heldout_emoji']} emoji)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
