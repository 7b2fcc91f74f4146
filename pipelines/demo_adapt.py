"""The Matryoshka-Adaptor in the demo: a standard model's full-width embeddings of training pairs (`python -m
mrl_clip embed`) -> `python -m mrl_clip adapt`, unsupervised on the images and supervised on the image-caption
pairs. Each is fitted with every setting in CANDIDATES and the one with the best held-out score wins; the held-out
rows are a seeded fraction of the TRAINING pairs (adapt --held-out, its --report), never the data the acts then
evaluate on. The acts evaluate the chosen adaptors with `python -m mrl_clip.eval TASK --adaptor FILE` against the
same model without one (plain truncation) and against the Matryoshka model (pipelines/demo.py, demo_align.py).
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from mrl_clip.eval.probe import checkpoint_identity
from mrl_clip.eval.report import format_side_by_side, plot_metrics
from mrl_clip.files import write_json
from mrl_clip.train.shards import resolve_shards
from pipelines.demo_commands import command, evaluate, export

# adapt's settings tried (a linear map, which keeps every full-width similarity exactly; its defaults otherwise:
# top-k 10, alpha 1): two learning rates for the same 200 steps (a tiny development run's held-out rows preferred
# 1e-2 to 1e-3, and the MLP of --hidden 256 was no better than the linear map at 1e-3 and slower)
CANDIDATES = {"lr 3e-3": ["--lr", "3e-3"], "lr 1e-2": ["--lr", "1e-2"]}
# what each kind is chosen by on its held-out rows (mean over the dims): neighbours kept for images alone,
# image <-> caption recall for pairs
SELECT_BY = {"images": "neighbour_recall@10_adapted", "pairs": "pair_recall@10_adapted"}


@dataclass
class AdaptPlan:
    pairs: int            # training pairs embedded
    steps: int = 200
    batch_size: int = 256
    held_out: float = 0.1


def export_pairs(shards: str, folder: Path, limit: int) -> Path:
    """The first `limit` samples (with a caption) of the shards as FOLDER/images/NNNNNN.png and FOLDER/captions.txt,
    line i the caption of image i: what `mrl_clip embed --images / --texts` reads, in the same order."""
    if (folder / "captions.txt").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    captions = []
    for sample in wds.WebDataset(resolve_shards(shards), shardshuffle=False, empty_check=False):
        caption = " ".join(sample["txt"].decode("utf-8").split())
        if not caption:
            continue
        (tmp / "images" / f"{len(captions):06d}.png").write_bytes(sample["png"])
        captions.append(caption)
        if len(captions) == limit:
            break
    (tmp / "captions.txt").write_text("".join(c + "\n" for c in captions))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def embed_pairs(run_dir: Path, folder: Path) -> dict:
    """{"images", "captions"}: full-width .npz files of the exported pairs by the run's model."""
    paths = {"images": folder / "images.npz", "captions": folder / "captions.npz"}
    for kind, source in (("images", ["--images", folder / "images"]), ("captions", ["--texts",
                                                                                     folder / "captions.txt"])):
        if not paths[kind].is_file():
            command("mrl_clip", "embed", "--model", export(run_dir), *source, "--output", paths[kind])
    return paths


def held_out_score(report: Path, metric: str) -> float:
    metrics = json.loads(report.read_text())["metrics"]
    return sum(row[metric] for row in metrics.values()) / len(metrics)


def fit(kind: str, embedded: dict, dims: list, folder: Path, plan: AdaptPlan) -> dict:
    """Adaptors of one kind ('images': unsupervised; 'pairs': supervised) with each candidate setting; returns
    {"adaptor": the chosen file, "chosen", "scores": {candidate: held-out score}}."""
    scores, files = {}, {}
    for name, flags in CANDIDATES.items():
        stem = f"{kind}-{name.replace(' ', '_')}"
        out, report = files.setdefault(name, folder / f"{stem}.safetensors"), folder / f"{stem}.report.json"
        if not (report.is_file() and out.is_file()):  # adapt writes the adaptor, then the report
            pairs = ["--pairs", embedded["captions"]] if kind == "pairs" else []
            command("mrl_clip", "adapt", "--embeddings", embedded["images"], *pairs, "--dims",
                    ",".join(map(str, dims)), "--out", out, "--steps", plan.steps, "--batch-size", plan.batch_size,
                    "--held-out", plan.held_out, *flags, "--report", report, quiet=True)
        scores[name] = held_out_score(report, SELECT_BY[kind])
    chosen = max(scores, key=scores.get)
    print(f"[demo] {kind} adaptor: {SELECT_BY[kind]} on held-out training rows (mean over dims) "
          + ", ".join(f"{n} {100 * s:.2f}" for n, s in scores.items()) + f" -> {chosen}", flush=True)
    return {"adaptor": str(files[chosen]), "chosen": chosen,
            "selected_by": SELECT_BY[kind], "scores": scores}


def for_model(folder: Path, run_dir: Path) -> None:
    """Empty FOLDER unless what it holds was made from the run's export as it is now (a re-trained model's
    embeddings and adaptors are stale)."""
    identity = json.loads(json.dumps(checkpoint_identity(export(run_dir))))
    record = folder / "model.json"
    if record.is_file() and json.loads(record.read_text()) == identity:
        return
    shutil.rmtree(folder, ignore_errors=True)
    write_json(identity, record)


def adapt_standard(run_dir: Path, shards: str, folder: Path, dims: list, plan: AdaptPlan) -> dict:
    """Both adaptors of the run's model from the first plan.pairs training pairs: {"images", "pairs"}: fit()."""
    for_model(folder, run_dir)
    embedded = embed_pairs(run_dir, export_pairs(shards, folder / "pairs", plan.pairs))
    return {kind: fit(kind, embedded, dims, folder, plan) for kind in ("images", "pairs")}


def merge(*entries) -> dict:
    """One {"dims", "metrics"} entry holding every entry's metrics at each dim (the dims of the first)."""
    dims = entries[0]["dims"]
    return {"dims": dims, "metrics": {str(d): {k: v for e in entries for k, v in e["metrics"][str(d)].items()}
                                      for d in dims}}


def evaluate_adapted(run_dir: Path, adaptors: dict, tasks: list, folder: Path, dims: list) -> dict:
    """{"standard + KIND adaptor": merged entry}: `python -m mrl_clip.eval TASK --adaptor FILE` on the run's model
    for each (task, data folder, extra flags) in `tasks`, FOLDER/TASK_KIND.json."""
    results = {}
    for kind, fitted in adaptors.items():
        entries = [next(iter(evaluate(task, {"standard": run_dir}, data, folder, dims, *extra, "--adaptor",
                                      fitted["adaptor"], output=f"{task}_{kind}.json")["models"].values()))
                   for task, data, extra in tasks]
        results[f"standard + {kind} adaptor"] = merge(*entries)
    return results


def report(results: dict, metrics: list, path: Path, title: str) -> None:
    """Print each metric's side-by-side table and plot them all."""
    for metric in metrics:
        print()
        print(format_side_by_side(results, metric))
    plot_metrics(results, metrics, path, title=title)
