"""OpenMoji 17.0.0 (npm package `openmoji`) -> real-caption training shards and a held-out retrieval folder.

    python -m pipelines.openmoji --out runs/demo/data [--size 128] [--passes 4] [--heldout-fraction 0.15]

fetches the package once with `npm pack openmoji@17.0.0` into --cache (default ~/.cache/mrl_clip/npm: shared by
every output folder, and kept by `make clean-demo`), checks its sha512 against the registry's, renders the colour
SVGs with resvg (RGB on white, --size px square) on --processes processes, and writes

- OUT/openmoji-0000.tar ... (+ OUT/sizes.json): one (png, txt) sample per image and pass, keys p<pass>_<hexcode>,
  one pass a shard; each of the --passes passes gives every training emoji one of its captions (the annotation,
  "an emoji of <annotation>", "<annotation>, <tags>", "emoji: <tags>", up to 5 of its Unicode and OpenMoji tags),
  cycling, so that 4 passes use each caption of an emoji once;
- OUT/openmoji_heldout/: the held-out emoji as a CLIP_benchmark retrieval folder (one caption per image: its
  annotation; hexcodes.txt lists the images' hexcodes in order), read by
  `clip_benchmark eval --dataset wds/openmoji_heldout --dataset_root OUT/openmoji_heldout --task zeroshot_retrieval`
  and `python -m mrl_clip.eval retrieval --data OUT/openmoji_heldout`;
- OUT/openmoji-build.json: what was built with which settings; a re-run with the same settings reuses each part.

Kept: one image per emoji with a caption of its own. Skin-tone variants (same drawing and annotation plus ": light
skin tone") are left out unless --skin-tones adds them to training, the 9 `component` swatches are left out, an
OpenMoji extra that repeats a Unicode emoji's annotation is left out (the Unicode one stays), and of emoji that
render to identical pixels the first in openmoji.json stays. Held out: an emoji whose base hexcode hashes
below --heldout-fraction (sha256 of "openmoji-heldout:<hexcode>"), so a skin-tone family is always on one side,
and the split does not depend on --limit or on the other emoji.
"""
import argparse
import base64
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mrl_clip.errors import ArgumentParser, UserError, run_cli
from mrl_clip.files import write_json
from pipelines.shards import brace_pattern, png_bytes, write_retrieval_folder, write_shards

PACKAGE, VERSION = "openmoji", "17.0.0"
# dist.integrity of openmoji@17.0.0 on the npm registry
INTEGRITY = "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w=="
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mrl_clip" / "npm"
PREFIX, HELDOUT, RECORD = "openmoji", "openmoji_heldout", "openmoji-build.json"
SIZES = range(16, 1025)
MAX_TAGS = 5
CAPTIONS_PER_IMAGE = 4  # annotation, "an emoji of ...", annotation + tags, tags (emoji without tags: the first 2)


def fetch_package(cache: Path) -> Path:
    """CACHE/openmoji-17.0.0.tgz, packed by npm on first use, its sha512 checked against the registry's."""
    tarball = Path(cache) / TARBALL
    if not tarball.is_file():
        if shutil.which("npm") is None:
            raise UserError(f"npm not found: install it (apt-get install -y npm) or pass --tarball {TARBALL}")
        try:
            tarball.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:
                result = subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp,
                                         "--fetch-retries", "1"], capture_output=True, text=True, timeout=600)
                if result.returncode != 0 or not (Path(tmp) / TARBALL).is_file():
                    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                    raise UserError(f"npm pack {PACKAGE}@{VERSION} failed (no network?): {last}")
                check_integrity(Path(tmp) / TARBALL)
                os.replace(Path(tmp) / TARBALL, tarball)
        except OSError as err:
            raise UserError(f"cannot write the npm cache {cache}: {err.strerror}") from None
    return tarball


def check_integrity(tarball: Path) -> None:
    digest = "sha512-" + base64.b64encode(hashlib.sha512(Path(tarball).read_bytes()).digest()).decode()
    if digest != INTEGRITY:
        raise UserError(f"{tarball} is not {PACKAGE}@{VERSION} (sha512 differs from the registry's); delete it")


def read_package(tarball: Path) -> tuple[list, dict]:
    """(openmoji.json's entries, {hexcode: colour SVG text}), read from the tarball without unpacking it."""
    if not Path(tarball).is_file():
        raise UserError(f"no such file: {tarball}")
    check_integrity(tarball)
    entries, svgs = None, {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.name == "package/data/openmoji.json":
                entries = json.load(tar.extractfile(member))
            elif member.name.startswith("package/color/svg/") and member.name.endswith(".svg"):
                svgs[member.name[len("package/color/svg/"):-4]] = tar.extractfile(member).read().decode()
    if entries is None:
        raise UserError(f"{tarball} holds no package/data/openmoji.json")
    return entries, svgs


def family(entry: dict) -> str:
    """The hexcode of the emoji's skin-tone family (its own when it has no skin tone)."""
    return entry["skintone_base_hexcode"] or entry["hexcode"]


def select_emoji(entries: list, skin_tones: bool = False) -> tuple[list, dict]:
    """The entries kept (in the file's order) and how many were dropped for each reason."""
    dropped = {"skin-tone variant": 0, "component": 0, "repeated annotation": 0}
    kept, seen = [], set()
    for entry in entries:  # openmoji.json lists Unicode emoji in Unicode order, then the extras
        annotation = entry["annotation"].strip().lower()
        if entry["skintone"] and not skin_tones:
            dropped["skin-tone variant"] += 1
        elif entry["group"] == "component":
            dropped["component"] += 1
        elif annotation in seen:
            dropped["repeated annotation"] += 1
        else:
            seen.add(annotation)
            kept.append(entry)
    return kept, dropped


def tag_list(entry: dict, by_hexcode: dict) -> list:
    """Unicode tags then OpenMoji tags, without repeats; a skin-tone variant has its base emoji's."""
    source = by_hexcode.get(entry["skintone_base_hexcode"], entry) if entry["skintone"] else entry
    tags, seen = [], set()
    for tag in (source["tags"] + "," + source["openmoji_tags"]).split(","):
        tag = " ".join(tag.split())
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            tags.append(tag)
    return tags


def captions(entry: dict, tags: list, rng: random.Random) -> list:
    """The training captions of one emoji; up to MAX_TAGS tags drawn by `rng`, kept in their listed order."""
    annotation = entry["annotation"].strip()
    result = [annotation, f"an emoji of {annotation}"]
    if tags:
        chosen = ", ".join(tags[i] for i in sorted(rng.sample(range(len(tags)), min(MAX_TAGS, len(tags)))))
        result += [f"{annotation}, {chosen}", f"emoji: {chosen}"]
    return result


def unit_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16 ** 12


def limited(entries: list, limit: int) -> list:
    """The entries of the `limit` families that hash first: a fixed sample spread over all groups."""
    families = sorted({family(e) for e in entries}, key=lambda f: unit_hash(f"openmoji-limit:{f}"))
    chosen = set(families[:limit])
    return [e for e in entries if family(e) in chosen]


def is_heldout(entry: dict, fraction: float) -> bool:
    return unit_hash(f"openmoji-heldout:{family(entry)}") < fraction


def render(job: tuple) -> tuple:
    """(hexcode, SVG text, size) -> (hexcode, PNG bytes of the RGB image on white, sha256 of its pixels)."""
    import resvg_py

    hexcode, svg, size = job
    data = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff",
                                 skip_system_fonts=True)
    image = Image.open(io.BytesIO(bytes(data))).convert("RGB")
    return hexcode, png_bytes(image), hashlib.sha256(image.tobytes()).hexdigest()


def render_all(entries: list, svgs: dict, size: int, processes: int) -> dict:
    """{hexcode: PNG bytes} for the entries, rendered on `processes` processes (1: in this one)."""
    missing = [e["hexcode"] for e in entries if e["hexcode"] not in svgs]
    if missing:
        raise UserError(f"the package has no colour SVG for {missing[:5]}")
    jobs = [(e["hexcode"], svgs[e["hexcode"]], size) for e in entries]
    bar = dict(total=len(jobs), desc=f"rendering {size}px", unit="emoji")
    if processes == 1:
        return {h: (png, digest) for h, png, digest in tqdm(map(render, jobs), **bar)}
    with multiprocessing.Pool(processes) as pool:
        return {h: (png, digest) for h, png, digest in tqdm(pool.imap(render, jobs, chunksize=16), **bar)}


def drop_identical_renders(entries: list, renders: dict) -> tuple[list, int]:
    """The entries whose pixels no earlier entry has (an image with two captions would make a retrieval miss)."""
    kept, seen = [], set()
    for entry in entries:
        digest = renders[entry["hexcode"]][1]
        if digest not in seen:
            seen.add(digest)
            kept.append(entry)
    return kept, len(entries) - len(kept)


def train_samples(entries: list, renders: dict, by_hexcode: dict, passes: int, seed: int):
    """Pass p gives each emoji its caption number (p + o) % n, o drawn per emoji, in an order shuffled per pass."""
    for p in range(passes):
        order = sorted(entries, key=lambda e: unit_hash(f"{seed}:{p}:{e['hexcode']}"))
        for entry in order:
            rng = random.Random(f"{seed}:{p}:{entry['hexcode']}")
            texts = captions(entry, tag_list(entry, by_hexcode), rng)
            offset = int(unit_hash(f"{seed}:offset:{entry['hexcode']}") * len(texts))
            yield {"__key__": f"p{p}_{entry['hexcode']}", "png": renders[entry["hexcode"]][0],
                   "txt": texts[(p + offset) % len(texts)]}


def write_heldout(entries: list, renders: dict, folder: Path) -> Path:
    pairs = [(Image.open(io.BytesIO(renders[e["hexcode"]][0])), [e["annotation"].strip()]) for e in entries]
    write_retrieval_folder(pairs, folder)
    (folder / "hexcodes.txt").write_text("".join(e["hexcode"] + "\n" for e in entries))
    return folder


def check_settings(size: int, passes: int, heldout_fraction: float, shard_size: int, processes: int, limit) -> None:
    if size not in SIZES:
        raise UserError(f"--size must be {SIZES.start}..{SIZES.stop - 1} pixels, not {size}")
    if passes < 1 or (shard_size is not None and shard_size < 1) or processes < 1:
        raise UserError("--passes, --shard-size and --processes must be at least 1")
    if not 0 < heldout_fraction < 1:
        raise UserError(f"--heldout-fraction must be between 0 and 1, not {heldout_fraction}")
    if limit is not None and limit < 2:
        raise UserError("--limit must be at least 2")


def prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UserError(f"cannot write to --out {out}: {err.strerror}") from None


def part_done(out: Path, record: dict, settings: dict, part: str) -> bool:
    if record.get("settings") != settings or part not in record:
        return False
    if part == "train":
        return all((out / name).is_file() for name in record["train"]["shards"])
    return (out / HELDOUT / "test" / "nshards.txt").is_file()


def build(out: Path, size: int = 128, *, cache: Path = DEFAULT_CACHE, tarball: Path = None, limit: int = None,
          passes: int = 4, heldout_fraction: float = 0.15, shard_size: int = None, skin_tones: bool = False,
          processes: int = 2, seed: int = 0) -> dict:
    """Training shards and the held-out retrieval folder under `out`; each part is built only when missing or
    built with other settings. Returns {"train": shard pattern, "heldout": folder, "train_samples", counts...}."""
    check_settings(size, passes, heldout_fraction, shard_size, processes, limit)
    out = Path(out)
    prepare_out(out)
    settings = dict(version=VERSION, size=size, limit=limit, passes=passes, heldout_fraction=heldout_fraction,
                    shard_size=shard_size, skin_tones=skin_tones, seed=seed)
    record_path = out / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    todo = [part for part in ("train", "heldout") if not part_done(out, record, settings, part)]
    if todo:
        record = {**(record if record.get("settings") == settings else {}), "settings": settings}
        record.update(make_parts(out, todo, settings, tarball or fetch_package(cache), processes))
        write_json(record, record_path)
    counts = record["counts"]
    return {"train": brace_pattern(out, PREFIX, len(record["train"]["shards"])), "heldout": out / HELDOUT,
            "train_samples": sum(record["train"]["shards"].values()), **counts}


def make_parts(out: Path, parts: list, settings: dict, tarball: Path, processes: int) -> dict:
    entries, svgs = read_package(tarball)
    by_hexcode = {e["hexcode"]: e for e in entries}
    kept, dropped = select_emoji(entries, settings["skin_tones"])
    if settings["limit"]:
        kept = limited(kept, settings["limit"])
    renders = render_all(kept, svgs, settings["size"], processes)
    kept, dropped["identical image"] = drop_identical_renders(kept, renders)
    heldout = [e for e in kept if is_heldout(e, settings["heldout_fraction"]) and not e["skintone"]]
    train = [e for e in kept if not is_heldout(e, settings["heldout_fraction"])]
    made = {"counts": {"emoji": len(train) + len(heldout), "train_emoji": len(train), "heldout_emoji": len(heldout),
                       "passes": settings["passes"], "dropped": dropped}}
    if "train" in parts:
        samples = train_samples(train, renders, by_hexcode, settings["passes"], settings["seed"])
        shard_size = settings["shard_size"] or len(train)  # one pass a shard: no image twice in a shard
        shards = write_shards(samples, out, PREFIX, shard_size, total=len(train) * settings["passes"])
        made["train"] = {"shards": shards}
    if "heldout" in parts:
        write_heldout(heldout, renders, out / HELDOUT)
        made["heldout"] = {"folder": HELDOUT}
    return made


def main(argv=None):
    parser = ArgumentParser(prog="python -m pipelines.openmoji", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"folder for the npm tarball (default {DEFAULT_CACHE})")
    parser.add_argument("--tarball", type=Path, default=None, help=f"use this {TARBALL} instead of npm")
    parser.add_argument("--passes", type=int, default=4, help="samples per training image, each its own caption")
    parser.add_argument("--heldout-fraction", type=float, default=0.15, help="share of emoji families held out")
    parser.add_argument("--shard-size", type=int, default=None, help="samples a shard (default: one pass a shard)")
    parser.add_argument("--skin-tones", action="store_true", help="add skin-tone variants to the training shards")
    parser.add_argument("--limit", type=int, default=None, help="only N emoji families (a fixed hash-drawn sample)")
    parser.add_argument("--processes", type=int, default=2, help="rendering processes (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the caption order and tag choice")
    args = parser.parse_args(argv)
    made = build(args.out, args.size, cache=args.cache, tarball=args.tarball, limit=args.limit, passes=args.passes,
                 heldout_fraction=args.heldout_fraction, shard_size=args.shard_size, skin_tones=args.skin_tones,
                 processes=args.processes, seed=args.seed)
    print(f"{made['emoji']} emoji: {made['train_emoji']} train ({made['train_samples']} samples), "
          f"{made['heldout_emoji']} held out; dropped {made['dropped']}")
    print(f"train shards:     {made['train']}\nheld-out folder:  {made['heldout']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
