"""The demo's second act: ALIGN-style pretrained towers (ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2, both
from PyPI packages) trained on OpenMoji's real captions, Matryoshka vs standard with the same budget; image<->text
recall at every dim on the held-out emoji; zero-shot, k-NN and few-shot on Fashion-MNIST with these towers
(pipelines/demo_neighbours.py); and the standard towers through Matryoshka-Adaptors fitted on their embeddings of
OpenMoji training pairs, on the held-out emoji against plain truncation (pipelines/demo_adapt.py).
"""
from pathlib import Path

from mrl_clip import towers
from mrl_clip.eval.report import format_side_by_side, plot_metrics
from mrl_clip.files import write_json
from pipelines import demo_2d, demo_adapt, demo_commands, demo_neighbours, fashion_mnist, openmoji
from pipelines.demo_commands import by_run, evaluate

MODEL, DIMS = towers.ALIGN_LITE, towers.ALIGN_LITE_DIMS
# Both towers locked, BatchNorm statistics and LayerNorms too: only the two projections learn. With
# --deterministic-towers (the validation transform, the locked trunks in eval mode) their outputs are a function of
# the sample, so --feature-cache computes them once, shared by both runs, and a step trains the projections alone
# (benchmarks/README.md: the cached step against the two tower forwards).
TOWER_FLAGS = ["--pretrained-image", "--lock-image", "--lock-image-freeze-bn-stats", "--lock-text",
               "--lock-text-freeze-layer-norm", "--deterministic-towers"]
# Fashion-MNIST with these towers: the first 500 test images (queries) and the first 500 training images (k-NN
# database, few-shot pool: 42 to 54 a class), each an EfficientNet forward at 128 px
FASHION_TEST_IMAGES, FASHION_TRAIN_IMAGES = 500, 500
NEIGHBOURS = demo_neighbours.NeighbourSettings(ks=(1, 10), shots=(1, 5, 10), draws=3, long_tail_largest=40)
# the adaptors: the first 1,000 training samples (pass 0 of the shards: 1,000 distinct emoji, one caption each),
# a fifth of them held out to choose the settings on
ADAPT = demo_adapt.AdaptPlan(pairs=1000, held_out=0.2)
RECALLS = ["image_retrieval_recall@1", "image_retrieval_recall@10", "text_retrieval_recall@10"]


def build_data(data_dir: Path, source: Path) -> dict:
    """OpenMoji shards + held-out retrieval folder, and a Fashion-MNIST folder of the first FASHION_TEST_IMAGES
    test images and FASHION_TRAIN_IMAGES training images (the EfficientNet forward is the cost of each)."""
    moji = openmoji.build(data_dir / "openmoji")
    print(f"[demo] OpenMoji: {moji['train_emoji']} training emoji ({moji['train_samples']} samples), "
          f"{moji['heldout_emoji']} held out", flush=True)
    fashion = data_dir / f"fashion_mnist_test_{FASHION_TEST_IMAGES}_train_{FASHION_TRAIN_IMAGES}"
    if not (fashion / "train" / "nshards.txt").is_file():
        fashion_mnist.build_eval_folder(source, fashion, limit=FASHION_TEST_IMAGES, train_limit=FASHION_TRAIN_IMAGES)
    return {"train": moji["train"], "heldout": moji["heldout"], "fashion": fashion}


def train(out: Path, name: str, dims: list, shards: str, args, *extra) -> Path:
    steps = args.align_steps
    return demo_commands.train(out, name, steps, [
        "--model", MODEL, *TOWER_FLAGS, "--feature-cache", out / "feature_cache", "--train-data", shards, "--dims", ",".join(map(str, dims)),
        "--batch-size", args.align_batch_size, "--train-num-samples", steps * args.align_batch_size, "--epochs", 1,
        "--lr", args.align_lr, "--warmup", max(1, steps // 10), "--wd", 0.1, "--workers", 1,
        "--threads", args.threads, "--seed", args.seed, "--save-every-n-steps", max(50, steps // 4), "--log-every-n-steps", 10, *extra])


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
    retrieval = by_run(runs, evaluate("retrieval", runs, data["heldout"], out, DIMS, "--plot",
                                      str(out / "retrieval.png")))
    zeroshot = by_run(runs, evaluate("zeroshot", runs, data["fashion"], out, DIMS, "--plot",
                                     str(out / "fashion_zeroshot.png")))
    neighbours = demo_neighbours.run(runs, data["fashion"], out, DIMS, NEIGHBOURS)
    results = {"retrieval": retrieval, "fashion_zeroshot": zeroshot, "fashion_knn": neighbours["knn"],
               "fashion_fewshot": neighbours["fewshot"]}
    write_json(results, out / "results.json")
    plot_metrics(retrieval, RECALLS, out / "recall_vs_dim.png",
                 title="OpenMoji held-out: ALIGN-style towers, Matryoshka vs standard")
    print()
    print(format_side_by_side(retrieval, "image_retrieval_recall@10"))
    print()
    print(format_side_by_side(zeroshot, "acc1"))
    print(summarise(retrieval))
    results["adaptor"] = adaptor(runs, data, retrieval, out)
    print("\n[demo] act 2: 2D Matryoshka, MiniLM's layers nested too", flush=True)
    results["two_d"] = demo_2d.run(runs, data, out, DIMS, lambda *a: train(*a[:4], args, *a[4:]))
    return results


def adaptor(runs: dict, data: dict, retrieval: dict, out: Path) -> dict:
    """The standard towers through adaptors fitted on their embeddings of OpenMoji training pairs, against
    themselves truncated and the Matryoshka towers: held-out emoji retrieval at every dim (align/adaptor.json)."""
    print("\n[demo] act 2: Matryoshka-Adaptors on the standard towers", flush=True)
    folder = out / "adaptor"
    adaptors = demo_adapt.adapt_standard(runs["align-standard"], data["train"], folder, DIMS, ADAPT)
    adapted = demo_adapt.evaluate_adapted(runs["align-standard"], adaptors, [("retrieval", data["heldout"], [])],
                                          folder, DIMS)
    results = {"align-mrl": retrieval["align-mrl"], "align-standard (truncated)": retrieval["align-standard"],
               **adapted}
    write_json({"adaptors": adaptors, "models": results}, out / "adaptor.json")
    demo_adapt.report(results, RECALLS[1:], out / "adaptor.png",
                      title="OpenMoji held-out: standard towers through Matryoshka-Adaptors vs truncated vs MRL")
    return results
