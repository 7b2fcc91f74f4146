"""`eval zeroshot|linear-probe|knn --dataset NAME --dataset-root DIR`: CLIP_benchmark's named sets, built by its
builder, on layouts made here from real Fashion-MNIST images: an ImageNet-R folder (its 200 wnid folders) and
torchvision's MNIST raw files (holding Fashion-MNIST's IDX images). Each against `--data` on the same images and
against `clip_benchmark eval` at full width."""
import ast
import inspect
import json
import struct

import pytest
from clip_benchmark.datasets import builder
from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset
from PIL import Image

from mrl_clip.eval import main as eval_main
from pipelines import fashion_mnist

from .conftest import TINY_DIMS, one_line_exit, run_module

METRICS = ("acc1", "acc5", "mean_per_class_recall")


def imagenet_r_wnids() -> list:
    """The wnids CLIP_benchmark's builder keeps for imagenet-r (a literal inside build_dataset), sorted as
    ImageFolder sorts its class folders."""
    for node in ast.walk(ast.parse(inspect.getsource(builder.build_dataset))):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "imagenet_r_wnids":
            return sorted(ast.literal_eval(node.value))
    raise AssertionError("imagenet_r_wnids not found in CLIP_benchmark's builder")


@pytest.fixture(scope="module")
def imagenet_r(tmp_path_factory):
    """An ImageNet-R layout (one Fashion-MNIST test image in each of its 200 wnid folders) and the same images as
    a CLIP_benchmark wds folder, written by CLIP_benchmark's converter from its own imagenet-r dataset (so with
    its class names and templates)."""
    images, _ = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")
    root = tmp_path_factory.mktemp("imagenet-r")
    for i, wnid in enumerate(imagenet_r_wnids()):
        (root / wnid).mkdir()
        Image.fromarray(images[i]).save(root / wnid / f"{i:03d}.png")
    wds = tmp_path_factory.mktemp("wds") / "imagenet-r"
    convert_dataset(builder.build_dataset("imagenet-r", root=str(root), download=False), "test", str(wds),
                    transform=PIL_to_bytes("png"), image_format="png", verbose=False)
    return root, wds


def write_idx(path, array):
    """An IDX file (the format torchvision's MNIST reads): magic 0x08 (ubyte), ndim, the sizes, the bytes."""
    path.write_bytes(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
                     + array.tobytes())


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """torchvision MNIST's raw layout holding the Fashion-MNIST images of fmnist_data's eval folder (its first 1000
    train and 500 test images, in order)."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix, count in (("train", "train", 1000), ("test", "t10k", 500)):
        images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, split)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:count])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[:count])
    return root


def eval_json(argv, path) -> dict:
    assert eval_main.main([str(a) for a in argv] + ["--output", str(path)]) == 0
    return json.loads(path.read_text())


def clip_benchmark_metrics(name, root, export, out) -> dict:
    result = run_module("clip_benchmark.cli", "eval", "--dataset", name, "--dataset_root", root,
                        "--model", f"local-dir:{export}", "--pretrained", "none",
                        "--task", "zeroshot_classification", "--no_amp", "--batch_size", "128",
                        "--num_workers", "0", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["metrics"]


def assert_close(ours: dict, reference: dict, names, tol):
    for name in names:
        assert abs(ours[name] - reference[name]) < tol, (name, ours, reference)


def test_imagenet_r_equals_data_at_every_dim_and_clip_benchmark_at_full_width(trained_run, imagenet_r, tmp_path,
                                                                             capsys):
    root, wds = imagenet_r
    model = f"local-dir:{trained_run['export']}"
    named = eval_json(["zeroshot", "--model", model, "--dataset", "imagenet-r", "--dataset-root", root,
                       "--plot", tmp_path / "named.png"], tmp_path / "named.json")
    table = capsys.readouterr().out
    folder = eval_json(["zeroshot", "--model", model, "--data", wds], tmp_path / "folder.json")
    entry = named["datasets"]["imagenet-r"]["models"]["export"]
    assert entry["dims"] == TINY_DIMS
    for dim in map(str, TINY_DIMS):
        assert_close(entry["metrics"][dim], folder["metrics"][dim], METRICS, 1e-6)
    reference = clip_benchmark_metrics("imagenet-r", root, trained_run["export"], tmp_path / "cb.json")
    assert_close(entry["metrics"]["256"], reference, METRICS, 1e-4)
    # the acc1 table: a row for the data set, a column per dim, the JSON's numbers in %
    lines = table.split("acc1:\n", 1)[1].splitlines()
    assert lines[0].split() == ["dataset", "\\", "dim"] + [str(d) for d in TINY_DIMS]
    assert lines[2].split() == ["imagenet-r"] + [f"{100 * entry['metrics'][str(d)]['acc1']:.2f}" for d in TINY_DIMS]
    assert (tmp_path / "named.png").stat().st_size > 1000


def test_mnist_layout_zeroshot_knn_and_probe_equal_data_and_clip_benchmark(trained_run, fmnist_data, mnist_root,
                                                                          tmp_path):
    """--dataset mnist reads torchvision's files: zero-shot against clip_benchmark eval (full width) and against
    CLIP_benchmark's wds conversion of the same set (every dim); k-NN and MRL probes (train split) against
    --data on fmnist_data's folder, which holds the same images."""
    model = f"local-dir:{trained_run['export']}"
    named = ["--model", model, "--dataset", "mnist", "--dataset-root", mnist_root, "--cache-dir", tmp_path / "c"]
    zeroshot = eval_json(["zeroshot", *named[:6]], tmp_path / "zs.json")["datasets"]["mnist"]["models"]["export"]
    reference = clip_benchmark_metrics("mnist", mnist_root, trained_run["export"], tmp_path / "cb.json")
    assert_close(zeroshot["metrics"]["256"], reference, METRICS, 1e-4)
    wds = tmp_path / "wds"
    convert_dataset(builder.build_dataset("mnist", root=str(mnist_root), split="test", download=False), "test",
                    str(wds), transform=PIL_to_bytes("png"), image_format="png", verbose=False)
    folder = eval_json(["zeroshot", "--model", model, "--data", wds], tmp_path / "zs_folder.json")
    for dim in map(str, TINY_DIMS):
        assert_close(zeroshot["metrics"][dim], folder["metrics"][dim], METRICS, 1e-6)

    data = ["--model", model, "--data", fmnist_data["eval"], "--cache-dir", tmp_path / "c"]
    for task, extra in (("knn", ["--k", "1,20"]), ("linear-probe", ["--probes", "mrl"])):
        ours = eval_json([task, *named, *extra, "--heads-dir", tmp_path / "h1"] if task != "knn"
                         else [task, *named, *extra], tmp_path / f"{task}.json")["datasets"]["mnist"]["models"]
        theirs = eval_json([task, *data, *extra, "--heads-dir", tmp_path / "h2"] if task != "knn"
                           else [task, *data, *extra], tmp_path / f"{task}_folder.json")["models"]
        assert list(ours) == list(theirs)
        for label in ours:
            for dim in map(str, TINY_DIMS):
                metrics = theirs[label]["metrics"][dim]
                assert_close(ours[label]["metrics"][dim], metrics, list(metrics), 1e-6)


@pytest.mark.parametrize("argv, message", [
    (["zeroshot", "--dataset", "imagenet-r", "--dataset-root", "{tmp}/absent"],
     "imagenet-r: {tmp}/absent does not exist; expected ROOT/<wnid>/<image> with its 200 wnid folders"),
    (["zeroshot", "--dataset", "imagenetv2", "--dataset-root", "{tmp}/absent"],
     "imagenetv2: expected ROOT/ImageNetV2-matched-frequency/"),
    (["zeroshot", "--dataset", "cifar10", "--dataset-root", "{tmp}/absent"],
     "cifar10: CLIP_benchmark cannot build it from {tmp}/absent: Dataset not found or corrupted"),
    (["knn", "--dataset", "imagenet-r", "--dataset-root", "{tmp}"],
     "imagenet-r has no 'train' split for knn (CLIP_benchmark builds test)"),
    (["zeroshot", "--dataset", "flickr30k"], "flickr30k is a zeroshot_retrieval data set"),
    (["zeroshot", "--dataset", "mnist", "--data", "{tmp}"], "give --data DIR or --dataset NAME (one of them)"),
])
def test_a_set_that_needs_a_download_is_one_line(trained_run, argv, message, tmp_path, capfd):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = one_line_exit(eval_main.main, [*argv, "--model", f"local-dir:{trained_run['export']}"], capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "absent").exists()  # nothing fetched, nothing made
