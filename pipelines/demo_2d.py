"""Act 2's 2D part: the ALIGN-style towers trained 2D Matryoshka (MiniLM's 6 layers nested as well as the dims)
against act 2's Matryoshka model at every (layer, dim) of the held-out emoji; what each depth costs to encode; and
`truncate` to the smallest export that keeps >= 95% of the 2D model's full recall@10, loaded in plain open_clip.
"""
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mrl_clip import models
from pipelines import demo_commands
from pipelines.demo_commands import by_run, evaluate

DEPTHS = [1, 2, 3, 4, 5, 6]  # all-MiniLM-L6-v2's layers
# every exit every step: one pass through the tower computes all of them, so the draw of sentence-transformers'
# default (one earlier layer a step) would save only a few loss terms
FLAGS = ["--text-layers", ",".join(map(str, DEPTHS)), "--layers-per-step", "-1"]
KEY = "image_retrieval_recall@10"  # text query -> images
KEEP = 0.95


def grid(entry: dict) -> dict:
    """{(depth, dim): text->image R@10} of one model's layered retrieval entry."""
    return {(row["text_layers"], int(d)): row["metrics"][d][KEY] for row in entry["grid"] for d in row["metrics"]}


def smallest_kept(cells: dict, full: float, depth: int = None) -> tuple:
    """The (depth, dim) with the fewest layers, then the fewest dims, keeping KEEP of `full` (at `depth` only if
    given)."""
    kept = [key for key, value in cells.items() if value >= KEEP * full and (depth is None or key[0] == depth)]
    return min(kept)


def encode_seconds(model, tokenizer, captions: list, rounds: int = 3) -> dict:
    """{depth: seconds to encode `captions`} with the text tower cut to its first `depth` layers (a copy whose
    encoder keeps those layers: what a shallower tower costs), the best of `rounds`."""
    tokens = tokenizer(captions)
    seconds = {}
    for depth in DEPTHS:
        cut = copy.deepcopy(model)
        cut.text.transformer.encoder.layer = cut.text.transformer.encoder.layer[:depth]
        with torch.no_grad():
            cut.encode_text(tokens[:8])  # warm-up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                cut.encode_text(tokens)
                times.append(time.perf_counter() - start)
        seconds[depth] = min(times)
    return seconds


def captions_of(heldout: Path) -> list:
    from mrl_clip.eval.zeroshot_retrieval import load_retrieval_folder

    return [c for _, per_image in load_retrieval_folder(str(heldout), lambda image: 0) for c in per_image]


PLAIN_OPEN_CLIP = """
import json, sys, open_clip, torch
assert "mrl_clip" not in sys.modules
model, _, _ = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
model.eval()
tokens = open_clip.get_tokenizer("local-dir:" + sys.argv[1])(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps(model.encode_text(tokens, normalize=True).tolist()))
"""


def check_in_plain_open_clip(folder: Path, model, tokenizer, depth: int, dim: int, captions: list) -> float:
    """The largest difference between the cut export's embeddings, computed by plain open_clip in a process of
    its own, and the full model's re-normalised dim-prefix at `depth`."""
    from mrl_clip.layers import TEXT, tower_exits

    out = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(folder), json.dumps(captions)],
                         capture_output=True, text=True, check=True)
    got = torch.tensor(json.loads(out.stdout))
    with torch.no_grad():
        want = torch.nn.functional.normalize(tower_exits(model, TEXT, tokenizer(captions), [depth])[0][:, :dim], dim=-1)
    return float((got - want).abs().max())


def run(runs: dict, data: dict, out: Path, dims: list, train) -> dict:
    """2D run, grid evaluation, encode time per depth, truncation (OUT/align/two_d.json)."""
    runs = {"align-mrl": runs["align-mrl"], "align-2d": train(out, "mrl2d", dims, data["train"], *FLAGS)}
    retrieval = by_run(runs, evaluate("retrieval", runs, data["heldout"], out, dims, "--text-layers",
                                      ",".join(map(str, DEPTHS)), "--plot", str(out / "retrieval_2d.png"),
                                      output="retrieval_2d.json"))
    cells = {label: grid(entry) for label, entry in retrieval.items()}
    full = cells["align-2d"][(DEPTHS[-1], dims[-1])]
    captions = captions_of(data["heldout"])
    model, _, _, tokenizer = models.create(demo_commands.export(runs["align-2d"]))  # the full 2D model
    model.eval()
    seconds = encode_seconds(model, tokenizer, captions)
    speed = {depth: seconds[DEPTHS[-1]] / s for depth, s in seconds.items()}
    best_any = smallest_kept(cells["align-2d"], full)
    # plain open_clip builds a Hugging Face tower at the depth its hub config names (docs/truncate.md): the export
    # keeps MiniLM's 6 layers and cuts the dim
    depth, dim = smallest_kept(cells["align-2d"], full, depth=DEPTHS[-1])
    folder = out / f"mrl2d-truncated-{dim}"
    if not (folder / "open_clip_config.json").is_file():
        demo_commands.command("mrl_clip", "truncate", "--model", demo_commands.export(runs["align-2d"]), "--dim", dim,
                              "--out", folder)
    gap = check_in_plain_open_clip(folder, model, tokenizer, depth, dim, captions[:16])
    sizes = {"full": file_size(Path(runs["align-2d"]) / "export"), "truncated": file_size(folder)}
    results = {"retrieval": retrieval, "encode_seconds": seconds, "speedup_vs_full_depth": speed,
               "full_recall@10": full, "smallest_kept_any_depth": list(best_any),
               "truncated": {"depth": depth, "dim": dim, "recall@10": cells["align-2d"][(depth, dim)],
                             "folder": str(folder), "max_abs_difference_in_plain_open_clip": gap, "bytes": sizes}}
    (out / "two_d.json").write_text(json.dumps(results, indent=1, default=str))
    report(cells, dims, speed, results)
    return results


def file_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix == ".safetensors")


def report(cells: dict, dims: list, speed: dict, results: dict) -> None:
    print("\n[demo] 2D: held-out text->image R@10 at each (MiniLM layers, dim)")
    for label, values in cells.items():
        print(f"  {label:10s} " + " ".join(f"{d:>5d}" for d in dims))
        for depth in DEPTHS:
            print(f"  layers {depth}   " + " ".join(f"{100 * values[(depth, d)]:5.1f}" for d in dims) +
                  f"   text encode {speed[depth]:.2f}x faster than 6 layers")
    best, cut = results["smallest_kept_any_depth"], results["truncated"]
    print(f"[demo] 2D: >= {KEEP:.0%} of the 2D model's full R@10 ({100 * results['full_recall@10']:.1f}): fewest "
          f"layers {best[0]} at {best[1]}-d; exported (MiniLM keeps its depth in plain open_clip): {cut['dim']}-d, "
          f"R@10 {100 * cut['recall@10']:.1f}, weights {cut['bytes']['truncated'] / cut['bytes']['full']:.2f}x, "
          f"plain open_clip max |difference| {cut['max_abs_difference_in_plain_open_clip']:.1e}", flush=True)
