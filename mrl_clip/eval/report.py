"""What an evaluation reports: the dims it covers, and its tables, JSON and plots of metrics per nested dim."""
from pathlib import Path

from .. import models
from ..dims import check_dims
from ..files import write_json
from ..quantize import bytes_per_vector


def default_dims(width: int, smallest: int = 8) -> list[int]:
    dims, m = [], smallest
    while m < width:
        dims.append(m)
        m *= 2
    return dims + [width]


def dims_for(name: str, requested) -> list:
    """The requested dims checked against the model's embedding width, or by default 8, 16, ... up to it."""
    width = models.embed_width(name)
    return check_dims(requested, width) if requested else default_dims(width)


def by_dim(metrics: dict) -> dict:
    """{dim: ...} with the dims as the strings JSON keys are."""
    return {str(m): v for m, v in metrics.items()}


def render_table(header: list, rows: list) -> str:
    """Right-aligned columns under a header and a rule."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(models: dict, metric_names: list) -> str:
    """models: {label: {"dims": [...], "metrics": {dim: {name: value}}}} -> dims as rows, metrics as columns
    (in %), one block per model."""
    blocks = []
    for label, entry in models.items():
        rows = []
        for dim in entry["dims"]:
            metrics = entry["metrics"].get(str(dim)) or entry["metrics"].get(dim)
            rows.append([str(dim)] + [f"{100 * metrics[name]:.2f}" for name in metric_names])
        blocks.append((f"== {label}\n" if len(models) > 1 else "") + render_table(["dim"] + metric_names, rows))
    return "\n\n".join(blocks)


def format_side_by_side(models: dict, metric: str) -> str:
    """One metric, one column per model: the compact comparison."""
    labels = list(models)
    dims = sorted({int(d) for entry in models.values() for d in entry["dims"]})
    header = ["dim"] + labels
    rows = []
    for dim in dims:
        row = [str(dim)]
        for label in labels:
            metrics = models[label]["metrics"].get(str(dim)) or models[label]["metrics"].get(dim)
            row.append(f"{100 * metrics[metric]:.2f}" if metrics else "-")
        rows.append(row)
    return f"{metric}:\n" + render_table(header, rows)


def metric_panels(count: int):
    """A figure with `count` panels, three to a row (matplotlib's Agg backend: files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, count)
    rows = (count + cols - 1) // cols
    return plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)


def save_panels(fig, axes, used: int, path, title: str = "") -> None:
    """Blank the unused panels, title, write the PNG (making its folder) and free the figure."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metrics(models: dict, metrics: list, path, title: str = "") -> None:
    """One panel per metric against dim (log2 axis), every model on each panel."""
    fig, axes = metric_panels(len(metrics))
    all_dims = sorted({int(d) for entry in models.values() for d in entry["dims"]})
    for ax, metric in zip(axes.flat, metrics):
        for label, entry in models.items():
            dims = [int(d) for d in entry["dims"]]
            values = [100 * (entry["metrics"].get(str(d)) or entry["metrics"][d])[metric] for d in dims]
            ax.plot(dims, values, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_dims, [str(d) for d in all_dims])
        ax.minorticks_off()
        ax.set_xlabel("embedding dim m (prefix z[:m])")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_panels(fig, axes, len(metrics), path, title)


def precision_entries(entry: dict) -> dict:
    """{precision: {"<dim>": metrics with "bytes_per_vector"}} with float32 first."""
    float32 = {str(d): {**(entry["metrics"].get(str(d)) or entry["metrics"][d]),
                        "bytes_per_vector": bytes_per_vector("float32", int(d))} for d in entry["dims"]}
    return {"float32": float32, **entry.get("quantized", {})}


def format_quantized_tables(models: dict, metric_names: list) -> str:
    """A table per model and precision: dims as rows, bytes per vector and the metrics (in %) as columns."""
    blocks = []
    for label, entry in models.items():
        for precision, by_dim in precision_entries(entry).items():
            rows = [[str(d), str(by_dim[str(d)]["bytes_per_vector"])]
                    + [f"{100 * by_dim[str(d)][name]:.2f}" for name in metric_names] for d in entry["dims"]]
            title = f"== {label}, {precision}" if len(models) > 1 else f"== {precision}"
            blocks.append(f"{title}\n" + render_table(["dim", "bytes"] + metric_names, rows))
    return "\n\n".join(blocks)


def precision_plot_path(path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_precision{path.suffix or '.png'}")


def plot_precisions(models: dict, metrics: list, path, title: str = "") -> None:
    """One panel per metric against bytes per vector (log2 axis), a line per model and precision through its dims:
    which precision and dim to store for a given byte budget."""
    markers = {"float32": "o", "float16": "s", "int8": "^", "binary": "D"}
    fig, axes = metric_panels(len(metrics))
    for ax, metric in zip(axes.flat, metrics):
        for label, entry in models.items():
            for precision, by_dim in precision_entries(entry).items():
                points = [by_dim[str(d)] for d in entry["dims"]]
                name = precision if len(models) == 1 else f"{label} {precision}"
                ax.plot([p["bytes_per_vector"] for p in points], [100 * p[metric] for p in points],
                        marker=markers.get(precision, "o"), label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per vector (points: the dims, smallest first)")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_panels(fig, axes, len(metrics), path, title)


def row_label(row: dict) -> str:
    """A grid row's depths: "text 4", or "image 2, text 4" when both towers are layered."""
    return ", ".join(f"{key[:-len('_layers')]} {value}" for key, value in row.items() if key.endswith("_layers"))


def grid_values(entry: dict, metric: str) -> list:
    """[rows][dims] of one metric (in %) over an entry's (layer, dim) grid."""
    return [[100 * row["metrics"][str(d)][metric] for d in entry["dims"]] for row in entry["grid"]]


def format_grid_tables(models: dict, metric_names: list) -> str:
    """A table per model and metric of a layered evaluation: depths as rows, dims as columns (in %)."""
    blocks = []
    for label, entry in models.items():
        if "grid" not in entry:
            continue
        for metric in metric_names:
            rows = [[row_label(row)] + [f"{v:.2f}" for v in values]
                    for row, values in zip(entry["grid"], grid_values(entry, metric))]
            title = f"== {label}, {metric}" if len(models) > 1 else f"== {metric}"
            blocks.append(f"{title}\n" + render_table(["layers \\ dim"] + [str(d) for d in entry["dims"]], rows))
    return "\n\n".join(blocks)


def layers_plot_path(path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_layers{path.suffix or '.png'}")


def plot_grid(models: dict, metrics: list, path, title: str = "") -> None:
    """A heatmap per model and metric of a layered evaluation: depths as rows, dims as columns, each cell
    annotated with its value (in %)."""
    panels = [(label, entry, metric) for label, entry in models.items() if "grid" in entry for metric in metrics]
    fig, axes = metric_panels(len(panels))
    for ax, (label, entry, metric) in zip(axes.flat, panels):
        values = grid_values(entry, metric)
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        for r, row in enumerate(values):
            for c, value in enumerate(row):
                light = image.norm(value) > 0.6  # viridis runs dark to light: dark text on the light cells
                ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
        ax.set_xticks(range(len(entry["dims"])), [str(d) for d in entry["dims"]])
        ax.set_yticks(range(len(entry["grid"])), [row_label(row) for row in entry["grid"]])
        ax.set_xlabel("embedding dim m (prefix z[:m])")
        ax.set_ylabel("layers run")
        ax.set_title(metric if len(models) == 1 else f"{label}: {metric}", fontsize=9)
        fig.colorbar(image, ax=ax, label="%")
    save_panels(fig, axes, len(panels), path, title)


def write_report(args, results: dict, metric_names: list, extra_tables=(), first_model=None) -> None:
    """Print the table (one per stored precision too, then `extra_tables`), write the --output JSON {"task", "data",
    "split", "models": results} and the --plot PNGs. `first_model` (name, pretrained) of a one-model zero-shot or
    retrieval run adds the top-level fields of earlier versions to the JSON, so their readers keep working. A
    layered evaluation (results with "grid") adds a table per metric and a heatmap, PLOT_layers.png."""
    quantized = any("quantized" in result for result in results.values())
    layered = any("grid" in result for result in results.values())
    print(format_table(results, metric_names))
    if quantized:
        print("\n" + format_quantized_tables(results, metric_names))
    if layered:
        print("\n" + format_grid_tables(results, metric_names))
    for table in extra_tables:
        print("\n" + table)
    if args.output:
        report = {"task": args.task, "data": args.data, "split": args.split, "models": results}
        if first_model:
            first = next(iter(results.values()))
            report.update(model=first_model[0], pretrained=first_model[1], dims=first["dims"],
                          metrics=first["metrics"])
            if "quantized" in first:
                report["quantized"] = first["quantized"]
        write_json(report, args.output)
    if args.plot:
        plot_metrics(results, metric_names, args.plot, title=f"{args.task}: metric vs embedding dim")
        if quantized:
            plot_precisions(results, metric_names, precision_plot_path(args.plot),
                            title=f"{args.task}: metric vs bytes per vector, one line per precision")
        if layered:
            plot_grid(results, metric_names, layers_plot_path(args.plot),
                      title=f"{args.task}: metric at each (layers, dim)")
