"""Act 1's full-width tax, measured: Matryoshka vs standard CLIP (act 1's model, data, lr and seed) at several
training budgets and dim weightings, zero-shot top-1 at every dim on the Fashion-MNIST test split. Both models get
the same budget and the same flags; only the Matryoshka run's --dim-weights vary.

    python -m pipelines.demo_tax --out runs/tax [--budgets 300,600,1200] [--weights 1,1,1,1,1,5] [--jobs 2]

Writes OUT/tax.json (every run's per-dim top-1 and the tax = standard - Matryoshka at full width) and
OUT/tax.png; finished runs are reused, so re-running only evaluates.
"""
import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mrl_clip.dims import parse_int_list
from mrl_clip.errors import ArgumentParser, UserError, run_cli
from mrl_clip.files import write_json
from pipelines import demo, fashion_mnist
from pipelines.demo_commands import evaluate

FULL = str(demo.DIMS[-1])


def run_args(args, steps: int) -> argparse.Namespace:
    """act 1's training settings (pipelines.demo's defaults) at `steps` steps, one thread per run."""
    return argparse.Namespace(steps=steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                              seed=args.seed)


def planned_runs(budgets: list, weights: list) -> list:
    """(name, steps, dims, extra flags): both models at every budget; each weighting at the smallest budget (run
    right after it: the cheap runs first)."""
    runs = []
    for steps in budgets:
        runs += [(f"mrl-{steps}", steps, demo.DIMS, []), (f"standard-{steps}", steps, demo.DIMS[-1:], [])]
        if steps == budgets[0]:
            runs += [(f"mrl-{steps}-w{w.replace(',', '_')}", steps, demo.DIMS, ["--dim-weights", w]) for w in weights]
    return runs


def evaluation_pairs(plan: list) -> list:
    """Each Matryoshka run with the standard run of its budget (the eval CLI compares two models)."""
    return [(name, f"standard-{steps}") for name, steps, dims, _ in plan if len(dims) > 1]


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per_dim in results.items():
        dims = sorted(per_dim, key=int)
        ax.plot([int(d) for d in dims], [100 * per_dim[d] for d in dims], marker="o",
                linestyle="--" if name.startswith("standard") else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dim (prefix)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title("Fashion-MNIST zero-shot: Matryoshka vs standard by training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tax"))
    parser.add_argument("--source", type=Path, default=fashion_mnist.DEBIAN_DIR)
    parser.add_argument("--budgets", default="300,600,1200", help="training steps per model")
    parser.add_argument("--weights", action="append", default=[],
                        help="a --dim-weights list for an extra Matryoshka run at the smallest budget (repeatable)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side")
    args = parser.parse_args(argv)
    budgets = parse_int_list(args.budgets, "--budgets")
    if not budgets or min(budgets) < 1:
        raise UserError("--budgets takes positive step counts, e.g. 300,600,1200")
    shards = demo.build_data(args.out / "data", args.source)
    plan = planned_runs(budgets, args.weights)

    def train(entry):
        name, steps, dims, extra = entry
        return name, demo.train(args.out, name, dims, shards, run_args(args, steps), *extra)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        run_dirs = dict(pool.map(train, plan))
    results = {}
    test_dir = args.out / "data" / "fashion_mnist_test"
    for first, second in evaluation_pairs(plan):
        pair = {first: run_dirs[first], second: run_dirs[second]}
        report = evaluate("zeroshot", pair, test_dir, args.out, demo.DIMS, output=f"zeroshot_{first}.json")
        for name, entry in zip(pair, report["models"].values()):
            results[name] = {dim: metrics["acc1"] for dim, metrics in entry["metrics"].items()}
    taxes = {steps: results[f"standard-{steps}"][FULL] - results[f"mrl-{steps}"][FULL] for steps in budgets}
    write_json({"results": results, "full_width_tax": taxes, "budgets": budgets, "weights": args.weights},
               args.out / "tax.json")
    plot(results, args.out / "tax.png")
    print(f"{'run':<28}" + "".join(f"{d:>8}" for d in demo.DIMS))
    for name, per_dim in results.items():
        print(f"{name:<28}" + "".join(f"{100 * per_dim[str(d)]:8.2f}" for d in demo.DIMS))
    for steps, tax in taxes.items():
        print(f"full-width tax (standard - Matryoshka) at {steps} steps: {100 * tax:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
