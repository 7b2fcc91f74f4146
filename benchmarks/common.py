"""What every benchmark shares: the machine description and where its JSON goes."""
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = ROOT / "runs" / "bench" / "quick"   # --quick runs only check that the scripts work: not committed
CACHE = ROOT / "runs" / "bench"

sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(threads=None) -> dict:
    """The machine, the library versions, and its load: another developer may share these cores."""
    import torch

    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": threads or torch.get_num_threads(), "loadavg_at_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        pass
    return info


def fmnist_shards(quick: bool) -> tuple:
    """(brace pattern, sample count) of Fashion-MNIST caption shards under runs/bench/, built once: all 60,000
    training images in 10 shards, or 2,048 in 4 for --quick."""
    from pipelines import fashion_mnist

    folder = CACHE / ("fmnist_shards_quick" if quick else "fmnist_shards")
    if not (folder / "sizes.json").is_file():
        fashion_mnist.build_train_shards(fashion_mnist.DEBIAN_DIR, folder, shard_size=512 if quick else 6000,
                                         limit=2048 if quick else None)
    count = len(list(folder.glob("train-*.tar")))
    return str(folder / f"train-{{0000..{count - 1:04d}}}.tar"), (2048 if quick else 60000)


def result_path(name: str, quick: bool) -> Path:
    return (QUICK_RESULTS if quick else RESULTS) / f"{name}.json"


def write_result(name: str, result: dict, quick: bool, path=None) -> Path:
    result = {**result, "quick": quick}
    result.setdefault("machine", machine())
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path = Path(path) if path else result_path(name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def median_ratio(numerators, denominators) -> float:
    """Median of per-round ratios: each round's pair ran back to back, so load drift cancels within a pair."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))
