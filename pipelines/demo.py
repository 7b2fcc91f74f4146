"""The embedded demo, in three acts, each at every nested dim, with tables, JSON files and plots:
1. Fashion-MNIST shards -> a Matryoshka CLIP and a standard CLIP trained from scratch with the same budget on the
   CPU -> zero-shot accuracy, retrieval recall, linear probes (MRL, MRL-E, per-dim baselines), cascades, k-NN and
   few-shot (pipelines/demo_neighbours.py), and the standard model through Matryoshka-Adaptors fitted on its
   embeddings of training pairs against plain truncation (pipelines/demo_adapt.py).
2. ALIGN-style pretrained towers (EfficientNet-Lite0 + all-MiniLM-L6-v2) trained on OpenMoji's captions,
   Matryoshka vs standard -> held-out image<->text recall, Fashion-MNIST zero-shot, k-NN and few-shot, and the
   standard towers through adaptors (pipelines/demo_align.py).
3. Act 1's standard model made Matryoshka by a short fine-tune (pipelines/demo_mrlize.py).

    python -m pipelines.demo --out runs/demo      (what `make demo` runs)
    python -m pipelines.demo --out runs/demo --acts siglip     (optional: act 1's MRL run with --siglip against
                                                                it, pipelines/demo_siglip.py)

Re-running resumes: built shards are kept, training resumes from its latest checkpoint, finished runs are reused.
"""
import argparse
import os
import sys
import time
from pathlib import Path

from mrl_clip.checkpoint import latest_checkpoint
from mrl_clip.errors import ArgumentParser, UserError, run_cli
from mrl_clip.eval.report import format_side_by_side, plot_metrics
from mrl_clip.files import write_json
from pipelines import demo_adapt, demo_align, demo_commands, demo_mrlize, demo_neighbours, demo_siglip, fashion_mnist
from pipelines.demo_commands import by_run, evaluate

MODEL = "MRL-Tiny-28"
DIMS = [8, 16, 32, 64, 128, 256]
PROBE_TRAIN_IMAGES = 2000
NEIGHBOURS = demo_neighbours.NeighbourSettings(ks=(1, 20), shots=(1, 5, 10), draws=3, long_tail_largest=100)
ADAPT = demo_adapt.AdaptPlan(pairs=5000)   # the first 5,000 training pairs, a tenth of them held out


def build_data(data_dir: Path, source: Path) -> str:
    """Training shards, the classification folder (test + a train split for probes), the retrieval folder;
    each part is built only when missing."""
    eval_dir, captions_dir = data_dir / "fashion_mnist_test", data_dir / "fashion_mnist_captions"
    shards = sorted(data_dir.glob("train-*.tar"))
    if (data_dir / "sizes.json").is_file() and shards:
        print(f"[demo] reusing shards in {data_dir}")
        pattern = str(data_dir / f"train-{{0000..{len(shards) - 1:04d}}}.tar")
    else:
        print(f"[demo] building shards from {source}")
        pattern = fashion_mnist.build_train_shards(source, data_dir, shard_size=6000)
    if not (eval_dir / "train" / "nshards.txt").is_file():
        fashion_mnist.build_eval_folder(source, eval_dir, train_limit=PROBE_TRAIN_IMAGES)
    if not (captions_dir / "test" / "nshards.txt").is_file():
        fashion_mnist.build_retrieval_folder(source, captions_dir, per_class=100)
    return pattern


def train(out: Path, name: str, dims: list, shards: str, args, *extra) -> Path:
    return demo_commands.train(out, name, args.steps, [
        "--model", MODEL, "--train-data", shards, "--dims", ",".join(map(str, dims)), "--batch-size", args.batch_size,
        "--train-num-samples", args.steps * args.batch_size, "--epochs", 1, "--lr", args.lr,
        "--warmup", max(1, args.steps // 20), "--workers", 1, "--threads", args.threads, "--seed", args.seed,
        "--save-every-n-steps", 100, "--log-every-n-steps", 10, *extra])


def summarise(results: dict) -> str:
    """The claim the demo exists to show, in numbers: what MRL keeps at the smallest dim."""
    mrl, std = results["mrl"]["metrics"], results["standard"]["metrics"]
    small, full = str(DIMS[0]), str(DIMS[-1])
    keep = mrl[small]["acc1"] / mrl[full]["acc1"]
    return (f"MRL at {small} dims keeps {100 * keep:.1f}% of its {full}-dim top-1 "
            f"({100 * mrl[small]['acc1']:.1f} vs {100 * mrl[full]['acc1']:.1f}); "
            f"the standard model truncated to {small} dims: {100 * std[small]['acc1']:.1f}; "
            f"full-dim gap (standard - MRL): {100 * (std[full]['acc1'] - mrl[full]['acc1']):+.1f} points")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--source", type=Path, default=fashion_mnist.DEBIAN_DIR)
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--align-steps", type=int, default=600,
                        help="act 2: training steps per model, from the feature cache (docs/demo.md: where the "
                             "curves flatten)")
    parser.add_argument("--align-batch-size", type=int, default=64)
    parser.add_argument("--align-lr", type=float, default=3e-3)
    parser.add_argument("--mrlize-steps", type=int, default=100, help="act 3: Matryoshka fine-tune steps")
    parser.add_argument("--mrlize-lr", type=float, default=1e-4)
    parser.add_argument("--acts", default="1,2,3",
                        help="which acts to run (act 3 needs act 1's standard model); 'siglip', not run by default: "
                             "act 1's MRL run with --siglip against act 1's MRL run")
    args = parser.parse_args(argv)
    for flag in ("steps", "align_steps", "align_batch_size", "mrlize_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    acts = set(args.acts.split(","))
    if not acts or not acts <= {"1", "2", "3", "siglip"}:
        raise UserError(f"--acts takes a comma-separated subset of 1,2,3,siglip, got {args.acts!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the towers come from PyPI packages (make setup); no hub here

    started = time.time()
    shards = build_data(args.out / "data", args.source)
    if "1" in acts or "3" in acts:
        runs = {"mrl": train(args.out, "mrl", DIMS, shards, args),
                "standard": train(args.out, "standard", DIMS[-1:], shards, args)}
    if "1" in acts:
        act_one(runs, shards, args)
    if "2" in acts:
        print("\n[demo] act 2: ALIGN-style pretrained towers on OpenMoji captions", flush=True)
        demo_align.run(args.out, args.source, args)
    if "3" in acts:
        print("\n[demo] act 3: the standard model made Matryoshka", flush=True)
        start = latest_checkpoint(runs["standard"] / "checkpoints")
        demo_mrlize.run(args.out, MODEL, start, shards, args.out / "data" / "fashion_mnist_test", DIMS, args)
    if "siglip" in acts:
        print("\n[demo] SigLIP: act 1's Matryoshka run with --siglip against it", flush=True)
        demo_siglip.run(args.out, train, shards, DIMS, args)
    print(f"[demo] results in {args.out} ({time.time() - started:.0f} s)")
    return 0


def act_one(runs: dict, shards: str, args) -> None:
    """Zero-shot, retrieval, linear probes, cascades, k-NN and few-shot of act 1's two models, and the adaptors."""
    data = args.out / "data"
    zeroshot = evaluate("zeroshot", runs, data / "fashion_mnist_test", args.out, DIMS)
    results = by_run(runs, zeroshot)
    write_json({"task": "zeroshot", "data": zeroshot["data"], "models": results}, args.out / "results.json")
    plot_metrics(results, ["acc1"], args.out / "accuracy_vs_dim.png",
                 title="Fashion-MNIST zero-shot top-1: MRL vs standard CLIP")
    evaluate("retrieval", runs, data / "fashion_mnist_captions", args.out, DIMS,
             "--plot", str(args.out / "retrieval.png"))
    evaluate("linear-probe", runs, data / "fashion_mnist_test", args.out, DIMS, "--plot",
             str(args.out / "linear_probe.png"))
    evaluate("cascade", runs, data / "fashion_mnist_test", args.out, DIMS)
    # after linear-probe: its feature cache of the same folder serves k-NN and few-shot
    neighbours = demo_neighbours.run(runs, data / "fashion_mnist_test", args.out, DIMS, NEIGHBOURS)
    print()
    print(format_side_by_side(results, "acc1"))
    print()
    print(summarise(results))
    act_one_adaptor(runs, shards, results, neighbours["knn"], args)
    print(f"[demo] act 1 results in {args.out}: results.json (zero-shot), retrieval.json, linear_probe.json, "
          "cascade.json, knn.json, fewshot.json, adaptor.json, accuracy_vs_dim.png, retrieval.png, "
          "linear_probe.png, knn.png, fewshot.png, adaptor.png")


def act_one_adaptor(runs: dict, shards: str, zeroshot: dict, knn: dict, args) -> dict:
    """The standard model through adaptors fitted on its embeddings of training pairs, against itself truncated
    and the MRL model: zero-shot and 1-NN top-1 on the test split (database: the probe train split)."""
    print("\n[demo] act 1: Matryoshka-Adaptors on the standard model", flush=True)
    test = args.out / "data" / "fashion_mnist_test"
    folder = args.out / "adaptor"
    adaptors = demo_adapt.adapt_standard(runs["standard"], shards, folder, DIMS, ADAPT)
    tasks = [("zeroshot", test, []), ("knn", test, ["--k", "1"])]
    adapted = demo_adapt.evaluate_adapted(runs["standard"], adaptors, tasks, folder, DIMS)
    results = {"mrl": demo_adapt.merge(zeroshot["mrl"], knn["mrl"]),
               "standard (truncated)": demo_adapt.merge(zeroshot["standard"], knn["standard"]), **adapted}
    write_json({"adaptors": adaptors, "models": results}, args.out / "adaptor.json")
    demo_adapt.report(results, ["acc1", "knn1_acc1"], args.out / "adaptor.png",
                      title="Fashion-MNIST test: standard CLIP through Matryoshka-Adaptors vs truncated vs MRL")
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
