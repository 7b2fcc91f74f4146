"""An optional demo act (`--acts siglip`, not in `make demo`): Matryoshka-SigLIP against act 1's Matryoshka-CLIP.

The same run as act 1's MRL model (data, steps, batch, learning rate, dims, seed) with `--siglip` added: open_clip's
sigmoid loss at every prefix instead of the CLIP loss, the model initialised as open_clip_train's --siglip does it.
Both are evaluated at every dim the same way as in act 1 (zero-shot on Fashion-MNIST's test split, image<->text
retrieval); act 1's MRL run is reused when it is already there.
"""
from pathlib import Path

from mrl_clip.eval.report import format_side_by_side, plot_metrics, render_table
from mrl_clip.files import write_json
from pipelines.demo_commands import by_run, evaluate

RETRIEVAL_METRICS = ["image_retrieval_recall@10", "text_retrieval_recall@10"]
# CLIP_benchmark's names: image retrieval ranks images for a caption, text retrieval captions for an image
DIRECTION = {"image_retrieval_recall@10": "text->image", "text_retrieval_recall@10": "image->text"}


def table(zeroshot: dict, retrieval: dict, dims: list) -> str:
    """Per dim: zero-shot top-1 and text->image / image->text R@10 (%) of both models."""
    labels = list(zeroshot)
    rows = []
    for m in dims:
        row = [str(m)]
        row += [f"{100 * zeroshot[label]['metrics'][str(m)]['acc1']:.2f}" for label in labels]
        row += [f"{100 * retrieval[label]['metrics'][str(m)][metric]:.2f}" for metric in RETRIEVAL_METRICS
                for label in labels]
        rows.append(row)
    header = (["dim"] + [f"top-1 {label}" for label in labels] +
              [f"{DIRECTION[metric]} R@10 {label}" for metric in RETRIEVAL_METRICS for label in labels])
    return render_table(header, rows)


def run(out: Path, train, shards: str, dims: list, args) -> dict:
    """`train(out, name, dims, shards, args, *extra_flags)` is act 1's training call."""
    runs = {"clip": train(out, "mrl", dims, shards, args), "siglip": train(out, "mrl_siglip", dims, shards, args,
                                                                           "--siglip")}
    data = out / "data"
    zeroshot = evaluate("zeroshot", runs, data / "fashion_mnist_test", out, dims, output="siglip_zeroshot.json")
    retrieval = evaluate("retrieval", runs, data / "fashion_mnist_captions", out, dims,
                         output="siglip_retrieval.json")
    results = {"zeroshot": by_run(runs, zeroshot), "retrieval": by_run(runs, retrieval)}
    write_json({"runs": {label: str(path) for label, path in runs.items()}, **results}, out / "siglip.json")
    plot_metrics(results["zeroshot"], ["acc1"],
                 out / "siglip_accuracy_vs_dim.png",
                 title="Zero-shot top-1: Matryoshka SigLIP vs CLIP")
    plot_metrics(results["retrieval"], RETRIEVAL_METRICS, out / "siglip_retrieval.png",
                 title="Retrieval R@10: Matryoshka SigLIP vs CLIP")
    print()
    print(format_side_by_side(results["zeroshot"], "acc1"))
    print()
    print(table(results["zeroshot"], results["retrieval"], dims))
    print(f"[demo] SigLIP act results in {out}: siglip.json, siglip_accuracy_vs_dim.png, siglip_retrieval.png")
    return results
