"""The demo's second act: ALIGN-style pretrained towers (ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2, both
from PyPI packages) trained on OpenMoji's real captions, Matryoshka vs standard with the same budget; image<->text
recall at every dim on the held-out emoji and zero-shot on Fashion-MNIST with these towers.
"""
from pathlib import Path

from mrl_clip import towers
from mrl_clip.eval.report import format_side_by_side, plot_metrics
from mrl_clip.files import write_json
from pipelines import demo_commands, fashion_mnist, openmoji
from pipelines.demo_commands import evaluate

MODEL, DIMS = towers.ALIGN_LITE, towers.ALIGN_LITE_DIMS
# Both towers locked, BatchNorm statistics and LayerNorms too: only the two projections learn. On a CPU a step is
# then two forwards; a backward through MiniLM's layers alone would more than double it (benchmarks/README.md).
TOWER_FLAGS = ["--pretrained-image", "--lock-image", "--lock-image-freeze-bn-stats", "--lock-text",
               "--lock-text-freeze-layer-norm"]
FASHION_TEST_IMAGES = 500


def build_data(data_dir: Path, source: Path) -> dict:
    """OpenMoji shards + held-out retrieval folder, and a Fashion-MNIST zero-shot folder of the first
    FASHION_TEST_IMAGES test images (the EfficientNet forward at 128 px is the cost of each image)."""
    moji = openmoji.build(data_dir / "openmoji")
    print(f"[demo] OpenMoji: {moji['train_emoji']} training emoji ({moji['train_samples']} samples), "
          f"{moji['heldout_emoji']} held out", flush=True)
    fashion = data_dir / f"fashion_mnist_test_{FASHION_TEST_IMAGES}"
    if not (fashion / "test" / "nshards.txt").is_file():
        fashion_mnist.build_eval_folder(source, fashion, limit=FASHION_TEST_IMAGES)
    return {"train": moji["train"], "heldout": moji["heldout"], "fashion": fashion}


def train(out: Path, name: str, dims: list, shards: str, args) -> Path:
    steps = args.align_steps
    return demo_commands.train(out, name, steps, [
        "--model", MODEL, *TOWER_FLAGS, "--train-data", shards, "--dims", ",".join(map(str, dims)),
        "--batch-size", args.align_batch_size, "--train-num-samples", steps * args.align_batch_size, "--epochs", 1,
        "--lr", args.align_lr, "--warmup", max(1, steps // 10), "--wd", 0.1, "--workers", 1,
        "--threads", args.threads, "--seed", args.seed, "--save-every-n-steps", 50, "--log-every-n-steps", 5])


def summarise(retrieval: dict) -> str:
    """What the Matryoshka towers keep at 1/8 of the width: text->image recall@10 against their own full width."""
    mrl, std = (entry["metrics"] for entry in retrieval.values())
    eighth, full = str(DIMS[-1] // 8), str(DIMS[-1])
    key = "image_retrieval_recall@10"  # CLIP_benchmark's name for text query -> images
    return (f"text->image R@10 at {eighth}-d (1/8 width): Matryoshka {100 * mrl[eighth][key]:.1f} "
            f"({100 * mrl[eighth][key] / mrl[full][key]:.1f}% of its {full}-d {100 * mrl[full][key]:.1f}), "
            f"standard {100 * std[eighth][key]:.1f} ({100 * std[eighth][key] / std[full][key]:.1f}% of "
            f"{100 * std[full][key]:.1f})")


def run(out: Path, source: Path, args) -> dict:
    """Act 2 under OUT/align/."""
    out = out / "align"
    data = build_data(out / "data", source)
    runs = {"align-mrl": train(out, "mrl", DIMS, data["train"], args),
            "align-standard": train(out, "standard", DIMS[-1:], data["train"], args)}
    retrieval = evaluate("retrieval", runs, data["heldout"], out, DIMS, "--plot", str(out / "retrieval.png"))
    retrieval = dict(zip(runs, retrieval["models"].values()))
    zeroshot = evaluate("zeroshot", runs, data["fashion"], out, DIMS, "--plot", str(out / "fashion_zeroshot.png"))
    zeroshot = dict(zip(runs, zeroshot["models"].values()))
    write_json({"retrieval": retrieval, "fashion_zeroshot": zeroshot}, out / "results.json")
    recalls = ["image_retrieval_recall@1", "image_retrieval_recall@10", "text_retrieval_recall@10"]
    plot_metrics(retrieval, recalls, out / "recall_vs_dim.png",
                 title="OpenMoji held-out: ALIGN-style towers, Matryoshka vs standard")
    print()
    print(format_side_by_side(retrieval, "image_retrieval_recall@10"))
    print()
    print(format_side_by_side(zeroshot, "acc1"))
    print(summarise(retrieval))
    return {"retrieval": retrieval, "fashion_zeroshot": zeroshot}
