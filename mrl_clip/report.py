"""Tables, JSON and plots of metrics per nested dim."""
import json
import os
from pathlib import Path


def default_dims(width: int, smallest: int = 8) -> list[int]:
    dims, m = [], smallest
    while m < width:
        dims.append(m)
        m *= 2
    return dims + [width]


def format_table(models: dict, metric_names: list) -> str:
    """models: {label: {"dims": [...], "metrics": {dim: {name: value}}}} -> a dim x (model, metric) table."""
    labels = list(models)
    header = ["dim"] + [f"{label} {name}" if len(labels) > 1 else name for label in labels for name in metric_names]
    rows = []
    all_dims = sorted({int(d) for entry in models.values() for d in entry["dims"]})
    for dim in all_dims:
        row = [str(dim)]
        for label in labels:
            metrics = models[label]["metrics"].get(str(dim)) or models[label]["metrics"].get(dim)
            row += [f"{100 * metrics[name]:.2f}" if metrics else "-" for name in metric_names]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def plot_metric(models: dict, metric: str, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, entry in models.items():
        dims = [int(d) for d in entry["dims"]]
        values = [100 * (entry["metrics"].get(str(d)) or entry["metrics"][d])[metric] for d in dims]
        ax.plot(dims, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    all_dims = sorted({int(d) for entry in models.values() for d in entry["dims"]})
    ax.set_xticks(all_dims, [str(d) for d in all_dims])
    ax.minorticks_off()
    ax.set_xlabel("embedding dim (prefix, re-normalised)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or metric)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
