"""Matryoshka-Adaptor (Yoon et al., 2024): a small map learnt on top of frozen full-width embeddings so that their
re-normalised prefixes are good embeddings, for a model that cannot be retrained or embeddings already stored.

    python -m mrl_clip adapt --embeddings photos.npz --dims 8,16,32,64,128,256 --out photos.adaptor.safetensors
    python -m mrl_clip adapt --embeddings images.npz --pairs captions.npz --dims ... --out pairs.adaptor.safetensors

The map is f(x) = x W^T + B gelu(A x) with W orthogonal (torch's orthogonal parametrisation while it trains),
W = I and B = 0 at the start: an untrained adaptor is plain truncation, bit for bit. With no MLP (--hidden 0, the
default) every full-width similarity is kept exactly, so the full-width embedding loses nothing while its prefixes
improve. Then, as everywhere in mrl_clip, a prefix is sliced from f(x) and re-normalised.

Unsupervised objective (no pairs: the paper's top-k and global similarity losses, and its reconstruction term, here
a penalty on the MLP's part), per batch of L2-normalised full-width embeddings x with cosine similarities S = x x^T:
    sum_m w_m * ( mean over each row's k most similar other rows of |S_m - S| + alpha * mean over all pairs |S_m - S| )
    + beta * mean ||B gelu(A x)||^2
where S_m holds the cosine similarities of the re-normalised m-prefixes of f(x). Supervised (--pairs: row i of the
two files is a matching pair, an image and its caption): the Matryoshka CLIP loss (mrl_clip.loss) of f(a) against
f(b), with a learnt logit scale started as CLIP's (1 / 0.07), plus the unsupervised terms of both sides.

The adaptor and its file live in mrl_clip.adaptor; embed, search and eval take it as --adaptor.
--held-out rows (a seeded fraction) are never trained on; the command ends with a table at every dim, on them,
of plain truncation against the adapted prefixes (--report FILE: the same as JSON, to choose settings on).
"""
import argparse
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .adaptor import MatryoshkaAdaptor, save_adaptor
from .dims import check_dims, check_weights, parse_float_list, parse_int_list
from .errors import ArgumentParser, UserError
from .eval.report import render_table
from .files import write_json
from .loss import MatryoshkaClipLoss
from .prefix import normalized_prefix_tensor
from .search.embed import read_embeddings


@dataclass
class AdaptSettings:
    dims: list
    weights: list
    steps: int = 500
    batch_size: int = 512
    lr: float = 1e-3
    topk: int = 10
    alpha: float = 1.0     # weight of the global pairwise term
    beta: float = 1.0      # weight of the penalty on the MLP's output
    hidden: int = 0
    seed: int = 0


def prefix_similarities(x, dim: int):
    z = normalized_prefix_tensor(x, dim)
    return z @ z.T


def similarity_loss(adaptor: MatryoshkaAdaptor, original, adapted, settings: AdaptSettings):
    """The unsupervised objective of the module docstring for one batch (original: L2-normalised rows; adapted:
    adaptor(original), passed in so a supervised step forwards each side once)."""
    target = original @ original.T
    k = min(settings.topk, len(original) - 1)
    # each row's k most similar other rows (itself excluded) by the full-width target
    neighbours = (target - 2 * torch.eye(len(original))).topk(k, dim=1).indices
    total = settings.beta * adaptor.residual(original).pow(2).sum(-1).mean()
    for dim, weight in zip(settings.dims, settings.weights):
        error = (prefix_similarities(adapted, dim) - target).abs()
        total = total + weight * (error.gather(1, neighbours).mean() + settings.alpha * error.mean())
    return total


def train_adaptor(embeddings, settings: AdaptSettings, pairs=None) -> MatryoshkaAdaptor:
    """An adaptor fitted to the rows of `embeddings` ([n, width], L2-normalised), or to the pairs
    (embeddings[i], pairs[i]) with the Matryoshka CLIP loss added."""
    torch.manual_seed(settings.seed)
    x = F.normalize(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), dim=-1)
    y = None if pairs is None else F.normalize(torch.as_tensor(np.asarray(pairs, dtype=np.float32)), dim=-1)
    adaptor = MatryoshkaAdaptor(x.shape[1], settings.dims, settings.hidden, trainable=True)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(adaptor.parameters()) + ([log_scale] if y is not None else [])
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    contrastive = MatryoshkaClipLoss(settings.dims, settings.weights)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in tqdm(range(settings.steps), desc="adaptor", unit="step", leave=False):
        rows = torch.randperm(len(x), generator=generator)[:settings.batch_size]
        adapted_x = adaptor(x[rows])
        loss = similarity_loss(adaptor, x[rows], adapted_x, settings)
        if y is not None:
            adapted_y = adaptor(y[rows])
            loss = loss + similarity_loss(adaptor, y[rows], adapted_y, settings)
            loss = loss + contrastive(adapted_x, adapted_y, log_scale.clamp(max=math.log(100)).exp())[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adaptor.finished()


def neighbour_recall(full, prefix_source, dim: int, k: int = 10) -> float:
    """How many of each row's k nearest rows at full width the re-normalised dim-prefixes of prefix_source find
    among their own k nearest (itself excluded), averaged."""
    eye = 2 * torch.eye(len(full))
    truth = (full @ full.T - eye).topk(k, dim=1).indices
    found = (prefix_similarities(prefix_source, dim) - eye).topk(k, dim=1).indices
    return float((truth[:, :, None] == found[:, None, :]).any(-1).float().mean())


def pair_recall(a, b, dim: int, k: int) -> float:
    """b -> a recall@k of the re-normalised dim-prefixes (row i of b should find row i of a)."""
    scores = normalized_prefix_tensor(b, dim) @ normalized_prefix_tensor(a, dim).T
    return float((scores.topk(k, dim=1).indices == torch.arange(len(a))[:, None]).any(-1).float().mean())


@torch.no_grad()
def held_out_table(adaptor, x, y=None) -> dict:
    """{dim: {metric_truncated, metric_adapted}} on held-out rows (x, y: L2-normalised float32 tensors)."""
    fx, fy = adaptor(x), None if y is None else adaptor(y)
    k = min(10, len(x) - 1)
    table = {}
    for dim in adaptor.dims:
        row = {"neighbour_recall@10_truncated": neighbour_recall(x, x, dim, k),
               "neighbour_recall@10_adapted": neighbour_recall(x, fx, dim, k)}
        if y is not None:
            for r in (1, 10):
                row[f"pair_recall@{r}_truncated"] = pair_recall(x, y, dim, r)
                row[f"pair_recall@{r}_adapted"] = pair_recall(fx, fy, dim, r)
        table[dim] = row
    return table


def read_full_width(path) -> np.ndarray:
    stored = read_embeddings(path)
    if stored.precision not in ("float32", "float16") or stored.dim != stored.width:
        raise UserError(f"{path} holds {stored.precision} {stored.dim}-d prefixes of {stored.width}-d embeddings: "
                        f"the adaptor learns from full-width float embeddings (embed without --dim/--precision)")
    return np.asarray(stored.codes, dtype=np.float32)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mrl_clip adapt", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, help="a full-width .npz written by `python -m mrl_clip embed`")
    p.add_argument("--pairs", default=None, help="a second .npz whose row i matches row i of --embeddings")
    p.add_argument("--dims", required=True, help="nested dims, strictly increasing, ending at the width")
    p.add_argument("--dim-weights", default=None)
    p.add_argument("--out", required=True, help="the adaptor file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--topk", type=int, default=10, help="neighbours per row in the top-k similarity term")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the global pairwise similarity term")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the penalty on the residual MLP's output (with --hidden)")
    p.add_argument("--hidden", type=int, default=0, help="width of the residual MLP (0: a linear map only)")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of rows kept out of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="also write the held-out table here as JSON "
                   '{"held_out_rows", "settings", "metrics": {"<dim>": {...}}}')
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "topk"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.alpha < 0 or args.beta < 0 or args.hidden < 0:
        raise UserError("--lr must be positive; --alpha, --beta and --hidden must not be negative")
    if not 0 < args.held_out < 1:
        raise UserError(f"--held-out must be between 0 and 1, got {args.held_out}")
    return args


def main(argv=None):
    args = parse_args(argv)
    x = read_full_width(args.embeddings)
    y = None if args.pairs is None else read_full_width(args.pairs)
    if y is not None and y.shape != x.shape:
        raise UserError(f"--pairs holds {y.shape[0]} x {y.shape[1]} embeddings; --embeddings {x.shape[0]} x "
                        f"{x.shape[1]}: row i of each must be a pair")
    dims = check_dims(parse_int_list(args.dims, "--dims"), x.shape[1], must_end_at_width=True)
    weights = check_weights(parse_float_list(args.dim_weights, "--dim-weights") if args.dim_weights else None, dims)
    order = np.random.default_rng(args.seed).permutation(len(x))
    held = order[:max(2, int(round(args.held_out * len(x))))]
    fit = order[len(held):]
    if len(fit) < 2:
        raise UserError(f"{len(x)} rows leave nothing to train on after --held-out {args.held_out}")
    settings = AdaptSettings(dims, weights, args.steps, args.batch_size, args.lr, args.topk, args.alpha, args.beta,
                             args.hidden, args.seed)
    adaptor = train_adaptor(x[fit], settings, None if y is None else y[fit])
    save_adaptor(adaptor, args.out)
    normal = lambda a: F.normalize(torch.as_tensor(a[held]), dim=-1)  # noqa: E731
    table = held_out_table(adaptor, normal(x), None if y is None else normal(y))
    print(format_held_out(table, len(held)))
    if args.report:
        write_json({"held_out_rows": len(held), "settings": asdict(settings),
                    "metrics": {str(dim): row for dim, row in table.items()}}, args.report)
    print(f"wrote {args.out} ({x.shape[1]}-d, dims {','.join(map(str, dims))})")
    return 0


def format_held_out(table: dict, rows: int) -> str:
    names = list(next(iter(table.values())))
    lines = [[str(dim)] + [f"{100 * values[n]:.2f}" for n in names] for dim, values in table.items()]
    return f"held-out rows: {rows}\n" + render_table(["dim"] + names, lines)
