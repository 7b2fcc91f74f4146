"""Data sets by name (`--dataset imagenet-r --dataset-root DIR`): built by CLIP_benchmark's own builder with its
class names and templates, as `clip_benchmark eval` builds them, for zeroshot, linear-probe and knn.

    python -m mrl_clip.eval zeroshot --model local-dir:runs/demo/mrl/export \
        --dataset imagenet-r,imagenet_sketch --dataset-root 'datasets/{dataset}' --output named.json

Nothing is ever downloaded: CLIP_benchmark fetches several sets itself whenever their root is missing (wget,
gdown), so each name's layout is checked here first, and a name whose files are not there is one line saying what
it expects and that it downloads. Output: one table per metric (data sets as rows, dims as columns; a block per
model), JSON {"task", "split", "datasets": {name: {"root", "models": {label: {"dims", "metrics"}}}}} and with
--plot one panel per metric, a line per data set (and model).
"""
import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..dims import parse_int_list
from ..errors import UserError
from ..files import write_json
from . import knn, probe, zeroshot
from .depths import requested_layers
from .report import by_dim, dims_for, plot_metrics, render_table

TASKS = ("zeroshot", "linear-probe", "knn")

# ImageFolder-style sets: (class folders CLIP_benchmark's class list expects, where CLIP_benchmark downloads from)
FOLDER_SETS = {
    "imagenet-r": (200, "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"),
    "imagenet-a": (200, "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar"),
    "imagenet-o": (200, "https://people.eecs.berkeley.edu/~hendrycks/imagenet-o.tar"),
    "imagenet_sketch": (1000, "Google Drive id 1Mj0i5HBthqH1p_yeXzsg22gZduvgoNeA (ImageNet-Sketch.zip)"),
}
# the splits CLIP_benchmark's builder accepts for each name it asserts on; the rest ignore `split` (one split only)
SPLITS = {
    **{name: ("test",) for name in (*FOLDER_SETS, "imagenetv2", "objectnet")},
    **{name: ("train", "test") for name in ("cifar10", "cifar100", "imagenet1k", "imagenet1k-unverified", "food101",
                                             "cars", "mnist", "stl10", "gtsrb", "fer2013", "voc2007")},
    **{name: ("train", "val", "test") for name in ("dtd", "flowers", "pcam", "renderedsst2")},
    "fgvc_aircraft": ("train", "val", "trainval", "test"), "pets": ("trainval", "test"),
    "country211": ("train", "valid", "test"),
}
# names whose torchvision class takes download=False and says itself what is missing
TORCHVISION_SETS = ("cifar10", "cifar100", "food101", "sun397", "cars", "fgvc_aircraft", "dtd", "pets", "flowers",
                    "mnist", "stl10", "eurosat", "gtsrb", "country211", "pcam", "renderedsst2", "voc2007",
                    "caltech101")
ONE_SPLIT = ("sun397", "caltech101", "eurosat")


@dataclass
class NamedSet:
    name: str
    root: str

    @property
    def key(self) -> str:
        """What the feature cache keys this set by."""
        return f"{self.name}:{Path(self.root).resolve()}"

    def build(self, transform, split: str, prompts: bool = True):
        """CLIP_benchmark's dataset (with .classes and .templates when `prompts`), never downloading."""
        from clip_benchmark.datasets.builder import build_dataset

        check_split(self.name, split)
        check_layout(self.name, self.root, split)
        task = "zeroshot_classification" if prompts else "linear_probe"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "split argument ignored" (checked above where it matters)
                return build_dataset(self.name, root=self.root, transform=transform, split=split, download=False,
                                     task=task)
        except (AssertionError, RuntimeError, OSError, ValueError, KeyError) as err:
            raise UserError(f"{self.name}: CLIP_benchmark cannot build it from {self.root}: "
                            f"{str(err).strip() or type(err).__name__}; it needs a download here") from None

    def collate_fn(self):
        from clip_benchmark.datasets.builder import get_dataset_collate_fn

        return get_dataset_collate_fn(self.name)


def check_split(name: str, split: str, purpose: str = "") -> None:
    if name in SPLITS and split not in SPLITS[name]:
        raise UserError(f"{name} has no {split!r} split{purpose} (CLIP_benchmark builds {', '.join(SPLITS[name])})")


def class_folders(root: Path) -> list:
    return [p for p in root.iterdir() if p.is_dir()]


def check_layout(name: str, root: str, split: str) -> None:
    """One line naming the expected layout where CLIP_benchmark would download (or fail) instead."""
    path = Path(root)
    if name in FOLDER_SETS:
        count, source = FOLDER_SETS[name]
        found = len(class_folders(path)) if path.is_dir() else 0
        if found != count:
            have = f"{root} has {found} class folders" if path.is_dir() else f"{root} does not exist"
            raise UserError(f"{name}: {have}; expected ROOT/<wnid>/<image> with its {count} wnid folders "
                            f"(CLIP_benchmark downloads it from {source}; no download here)")
    elif name in ("imagenet1k", "imagenet1k-unverified"):
        folder = path / ("train" if split == "train" else "val")
        meta = name == "imagenet1k-unverified" or (path / "meta.bin").is_file() \
            or (path / "ILSVRC2012_devkit_t12.tar.gz").is_file()
        if not (folder.is_dir() and meta):
            need = "" if name == "imagenet1k-unverified" else " and meta.bin or ILSVRC2012_devkit_t12.tar.gz"
            raise UserError(f"{name}: expected ROOT/{folder.name}/<wnid>/<image> (1000 folders){need} under {root} "
                            "(CLIP_benchmark downloads ILSVRC2012 from image-net.org; no download here)")
    elif name == "imagenetv2":
        folder = path / "ImageNetV2-matched-frequency"
        found = sum(1 for _ in folder.glob("**/*.jpeg")) if folder.is_dir() else 0
        if found != 10000:
            raise UserError(f"imagenetv2: expected ROOT/ImageNetV2-matched-frequency/<class 0-999>/<image>.jpeg, "
                            f"all 10,000 images (found {found} under {root}); CLIP_benchmark downloads it otherwise "
                            "(huggingface.co/datasets/vaishaal/ImageNetV2; no download here)")
    elif name == "fer2013":
        if not (path / ("train" if split == "train" else "test")).is_dir():
            raise UserError(f"fer2013: expected ROOT/train and ROOT/test class folders under {root} "
                            "(CLIP_benchmark downloads it with kaggle; no download here)")
    elif name == "objectnet":
        if not (path / "objectnet-1.0").is_dir():
            raise UserError(f"objectnet: expected ROOT/objectnet-1.0 and its mappings under {root} "
                            "(CLIP_benchmark downloads it from objectnet.dev; no download here)")
    elif name not in TORCHVISION_SETS:
        raise UserError(unsupported(name))


def unsupported(name: str) -> str:
    from clip_benchmark.datasets.builder import get_dataset_default_task

    task = get_dataset_default_task(name)
    if task != "zeroshot_classification":
        return f"{name} is a {task} data set: these tasks classify (eval retrieval reads a caption folder with --data)"
    if name.startswith("wds/"):
        return f"{name} is a CLIP_benchmark wds folder: give it as --data DIR"
    return f"--dataset {name}: not a classification set that can be read here without a download " \
           f"(named sets: {', '.join(sorted(set(SPLITS) | set(TORCHVISION_SETS)))})"


def dataset_names(values: list) -> list:
    """--dataset values (repeatable, comma lists, CLIP_benchmark collection names such as imagenet_robustness)."""
    from clip_benchmark.datasets.builder import dataset_collection

    names = []
    for value in values:
        for name in (n.strip() for n in value.split(",")):
            if name:
                names.extend(dataset_collection.get(name, [name]))
    if not names:
        raise UserError("--dataset takes data set names")
    return list(dict.fromkeys(names))


def named_sets(args) -> list:
    """[NamedSet] with --dataset-root formatted as clip_benchmark does ({dataset}, {dataset_cleaned})."""
    return [NamedSet(n, args.dataset_root.format(dataset=n, dataset_cleaned=n.replace("/", "-")))
            for n in dataset_names(args.dataset)]


def add_flags(sub):
    sub.add_argument("--dataset", action="append", default=None, metavar="NAME[,NAME...]",
                     help="a data set by CLIP_benchmark's name, built by its builder (repeatable; instead of --data)")
    sub.add_argument("--dataset-root", default="root", metavar="DIR",
                     help="where the named sets lie; may hold {dataset}, as clip_benchmark's --dataset_root")


def check_flags(args) -> None:
    """--data or --dataset, one of them; --dataset runs the plain per-dim evaluation only."""
    if (args.data is None) == (args.dataset is None):
        raise UserError("give --data DIR or --dataset NAME (one of them)")
    if args.dataset is None:
        return
    if getattr(args, "embedding_precision", "float32") != "float32" or any(requested_layers(args).values()):
        raise UserError("--embedding-precision and --image-layers / --text-layers read --data folders only")


def zeroshot_entry(model, preprocess, tokenizer, dataset: NamedSet, args, dims) -> dict:
    built = dataset.build(preprocess, args.split)
    data = zeroshot.ClassificationSet(built, built.classes, built.templates, dataset.collate_fn())
    features = zeroshot.encode_classification(model, tokenizer, data, dims, args.device, args.batch_size,
                                              args.workers)
    return {"dims": dims, "metrics": by_dim(zeroshot.zeroshot_metrics(*features, dims))}


def run_zeroshot(args, entries, requested, datasets) -> dict:
    results = {d.name: {} for d in datasets}
    for label, name, ckpt in entries:
        dims = dims_for(name, requested)
        model, _, preprocess, tokenizer = models.create(name, ckpt, device=args.device, adaptor=args.adaptor)
        for dataset in datasets:
            results[dataset.name][label] = zeroshot_entry(model, preprocess, tokenizer, dataset, args, dims)
    return results


def check_train_split(datasets, args) -> None:
    for d in datasets:
        if d.name in ONE_SPLIT:
            raise UserError(f"{d.name} has no predefined train/test split in CLIP_benchmark: {args.task} needs one")
        check_split(d.name, args.train_split, f" for {args.task}")


def run_linear_probe(args, entries, requested, datasets) -> dict:
    kinds = probe.probe_kinds(args.probes)
    check_train_split(datasets, args)
    results = {d.name: {} for d in datasets}
    for dataset in datasets:
        for label, name, ckpt in entries:
            # each data set's heads in a folder of its own beside the checkpoint (or under --heads-dir)
            folder = probe.heads_path(args, name, ckpt, "x").parent / dataset.name.replace("/", "_")
            local = copy.copy(args)
            local.heads_dir = str(folder)
            for kind, result in probe.run_linear_probe(local, name, ckpt, dims_for(name, requested), kinds,
                                                       source=dataset).items():
                results[dataset.name][f"{label} [{kind}]"] = result
    return results


def run_knn(args, entries, requested, datasets) -> dict:
    ks = knn.positive_ks(parse_int_list(args.k, "--k"))
    check_train_split(datasets, args)
    return {d.name: {label: knn.knn_result(args, name, ckpt, dims_for(name, requested), ks, {}, source=d)
                     for label, name, ckpt in entries} for d in datasets}


def metric_names(args) -> list:
    if args.task == "zeroshot":
        return zeroshot.METRICS
    if args.task == "knn":
        return knn.metric_names(knn.positive_ks(parse_int_list(args.k, "--k")))
    return probe.METRICS


def format_tables(results: dict, metric_names: list) -> str:
    """A table per metric (and model): data sets as rows, dims as columns, in %."""
    labels = list(dict.fromkeys(label for by_model in results.values() for label in by_model))
    blocks = []
    for metric in metric_names:
        for label in labels:
            dims = sorted({int(d) for by_model in results.values() for d in by_model[label]["dims"]})
            rows = [[name] + [f"{100 * by_model[label]['metrics'][str(d)][metric]:.2f}"
                              if str(d) in by_model[label]["metrics"] else "-" for d in dims]
                    for name, by_model in results.items()]
            title = f"{metric}" + (f", {label}" if len(labels) > 1 else "") + ":"
            blocks.append(f"{title}\n" + render_table(["dataset \\ dim"] + [str(d) for d in dims], rows))
    return "\n\n".join(blocks)


def write_report(args, results: dict, datasets, metrics: list) -> None:
    print(format_tables(results, metrics))
    if args.output:
        write_json({"task": args.task, "split": args.split,
                    "datasets": {d.name: {"root": d.root, "models": results[d.name]} for d in datasets}},
                   args.output)
    if args.plot:
        one_model = all(len(by_model) == 1 for by_model in results.values())
        lines = {(name if one_model else f"{name}: {label}"): entry
                 for name, by_model in results.items() for label, entry in by_model.items()}
        plot_metrics(lines, metrics, args.plot, title=f"{args.task}: metric vs embedding dim, per data set")


RUNNERS = {"zeroshot": run_zeroshot, "linear-probe": run_linear_probe, "knn": run_knn}


def run_task(args, entries, requested) -> int:
    """`eval TASK --dataset NAME ...`: each data set's metrics at each dim for each model, reported together."""
    datasets = named_sets(args)
    metrics = metric_names(args)
    results = RUNNERS[args.task](args, entries, requested, datasets)
    write_report(args, results, datasets, metrics)
    return 0


def default_cache_dir() -> str:
    """Named sets keep their feature cache outside their root (an ImageFolder would read a folder there as a
    class)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "mrl_clip" / "features")
