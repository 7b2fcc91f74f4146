"""The MRL paper's k-NN and few-shot evaluations in the demo, at every dim of two models side by side: `python -m
mrl_clip.eval knn` (a classification folder's train split as the database, its test split as the queries) and
`python -m mrl_clip.eval fewshot` (n shots a class drawn from the train split, nearest class mean and a linear probe,
averaged over seeded draws; with a Zipf long-tailed train split, its frequent and rare halves of the classes apart).
Both read the features through the eval feature cache, so a folder whose features a linear probe already encoded
costs no forward pass."""
from dataclasses import dataclass
from pathlib import Path

from mrl_clip.eval.report import render_table
from pipelines.demo_commands import by_run, evaluate


@dataclass
class NeighbourSettings:
    ks: tuple = (1, 20)
    shots: tuple = (1, 5, 10)
    draws: int = 3
    long_tail_largest: int = 100   # images kept by the most frequent class of the long tail (0: none)


def joined(values) -> str:
    return ",".join(map(str, values))


def run(runs: dict, data: Path, out: Path, dims: list, settings: NeighbourSettings) -> dict:
    """knn.json / knn.png and fewshot.json / fewshot.png under OUT; {"knn", "fewshot"}: {run name: entry}."""
    knn = evaluate("knn", runs, data, out, dims, "--k", joined(settings.ks), "--plot", out / "knn.png")
    tail = ["--long-tail-largest", settings.long_tail_largest] if settings.long_tail_largest else []
    fewshot = evaluate("fewshot", runs, data, out, dims, "--shots", joined(settings.shots), "--draws",
                       settings.draws, *tail, "--plot", out / "fewshot.png")
    results = {"knn": by_run(runs, knn), "fewshot": by_run(runs, fewshot)}
    print()
    print(table(results, settings))
    return results


def columns(settings: NeighbourSettings) -> list:
    """(task, metric, column title) of the demo's compact table."""
    cols = [("knn", f"knn{k}_acc1", f"{k}-NN") for k in settings.ks]
    cols += [("fewshot", f"fewshot{n}_ncm_acc1", f"{n}-shot") for n in settings.shots]
    if settings.long_tail_largest:
        cols += [("fewshot", f"longtail_ncm_acc1_{part}", f"tail {part}") for part in ("frequent", "rare")]
    return cols


def table(results: dict, settings: NeighbourSettings) -> str:
    """Top-1 (%) by dim, a block per model: k-NN, n-shot nearest class mean and (with the long tail) its halves."""
    cols, blocks = columns(settings), []
    for name, entry in results["knn"].items():
        rows = [[str(dim)] + [f"{100 * results[task][name]['metrics'][str(dim)][metric]:.2f}"
                              for task, metric, _ in cols] for dim in entry["dims"]]
        blocks.append(f"== {name}\n" + render_table(["dim"] + [title for _, _, title in cols], rows))
    return "k-NN and few-shot top-1 (%; few-shot: nearest class mean, mean of the draws):\n" + "\n\n".join(blocks)
