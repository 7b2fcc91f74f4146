"""The nesting record every verb reads (mrl_clip.nesting): a dim or depth the model was not trained at runs as
asked, with one warning line on stderr per model; full width never warns; the results are those of the same
command on the same weights without the record, and of a float64 re-computation from the full-width vectors."""
import json

import numpy as np
import pytest

from mrl_clip.checkpoint import nesting_record
from mrl_clip.search.embed import read_embeddings
from tests.conftest import TINY, TINY_DIMS, run_verb
from tests.test_truncate import tiny_export, warnings_in

TRAINED = ",".join(map(str, TINY_DIMS))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same 4-layer tiny model (seed 0) exported three times: with an MRL record (dims 8..256, image depths
    2,4), with a standard run's record (its width only) and with none (another tool's export)."""
    base = tmp_path_factory.mktemp("records")
    return {"mrl": tiny_export(base / "mrl", nesting=nesting_record(TINY_DIMS, [2, 4])),
            "standard": tiny_export(base / "standard", nesting=nesting_record([256])),
            "bare": tiny_export(base / "bare")}


def embed(model, images, out, dim=None, capfd=None):
    """(stored file, the warning lines) of one `embed` run in this process."""
    capfd.readouterr()
    run_verb("embed", "--model", model, "--images", images, "--output", out, *(["--dim", dim] if dim else []))
    return read_embeddings(out), warnings_in(capfd.readouterr().err)


def float64_prefix(full: np.ndarray, m: int) -> np.ndarray:
    prefix = full[:, :m].astype(np.float64)
    return prefix / np.linalg.norm(prefix, axis=1, keepdims=True)


def test_embed_warns_once_per_case_and_stores_the_same_vectors(exports, image_folder, tmp_path, capfd):
    local = {kind: f"local-dir:{folder}" for kind, folder in exports.items()}
    full, lines = embed(local["bare"], image_folder, tmp_path / "full.npz", capfd=capfd)
    assert lines == []  # full width never warns, even without a record
    reference = full.codes.astype(np.float64)

    at48, lines = embed(local["mrl"], image_folder, tmp_path / "mrl48.npz", 48, capfd)
    assert len(lines) == 1 and f"dim 48 (trained: {TRAINED})" in lines[0] and "interpolate" in lines[0], lines
    assert np.allclose(at48.codes, float64_prefix(reference, 48), atol=1e-6)
    config = json.loads((exports["mrl"] / "open_clip_config.json").read_text())
    assert at48.meta["nesting"] == {k: config[k] for k in ("matryoshka_dimensions", "matryoshka_layers")}

    stored = {}
    for kind, expected in (("mrl", None), ("standard", "was trained without Matryoshka nesting"),
                           ("bare", "records no Matryoshka nesting")):
        stored[kind], lines = embed(local[kind], image_folder, tmp_path / f"{kind}64.npz", 64, capfd)
        if expected is None:
            assert lines == [], lines  # 64 is a trained dim
        else:
            assert len(lines) == 1 and expected in lines[0] and "never trained (dim 64" in lines[0], lines
    # the record changes what is said, never what is stored: the same weights give the same bytes
    assert np.array_equal(stored["mrl"].codes, stored["standard"].codes)
    assert np.array_equal(stored["mrl"].codes, stored["bare"].codes)
    assert np.allclose(stored["bare"].codes, float64_prefix(reference, 64), atol=1e-6)
    assert stored["bare"].meta["nesting"] == {} and stored["standard"].meta["nesting"] == {
        "matryoshka_dimensions": [256]}

    _, lines = embed(TINY, image_folder, tmp_path / "name.npz", 32, capfd)  # an open_clip name, no weights of ours
    assert len(lines) == 1 and lines[0].startswith(f"warning: {TINY} records no Matryoshka nesting"), lines


def test_search_warns_from_the_record_embed_wrote_and_an_old_file_says_nothing(exports, image_folder, tmp_path,
                                                                                capfd):
    db = tmp_path / "db.npz"
    run_verb("embed", "--model", f"local-dir:{exports['mrl']}", "--images", image_folder, "--output", db)
    old = tmp_path / "old.npz"  # as `embed` wrote it before it recorded the model's nesting
    with np.load(db) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["nesting"]
    np.savez(old, **{**arrays, "meta": np.array(json.dumps(meta))})
    capfd.readouterr()

    def search(index, *flags):
        out = tmp_path / "hits.json"
        run_verb("search", "--index", index, "--queries", db, "--k", 5, *flags, "--output", out)
        return json.loads(out.read_text())["queries"], warnings_in(capfd.readouterr().err)

    hits48, lines = search(db, "--dim", 48)
    assert len(lines) == 1 and f"dim 48 (trained: {TRAINED})" in lines[0] and str(db) in lines[0], lines
    old48, lines = search(old, "--dim", 48)
    assert lines == [] and old48 == hits48  # no record: nothing guessed, and the same hits
    assert search(db, "--dim", 64)[1] == []
    _, lines = search(db, "--funnel", "48:20,96:10,256:5")
    assert len(lines) == 1 and "dims 48,96 (trained" in lines[0], lines  # one line for the funnel's stages

    index = tmp_path / "db.index"  # `index build` keeps the file's meta, and with it the record
    run_verb("index", "build", "--embeddings", db, "--stage1", "48", "--out", index)
    capfd.readouterr()
    from_index, lines = search(index, "--dim", 48)
    assert len(lines) == 1 and "dim 48 (trained" in lines[0], lines
    assert [[h["id"] for h in q["results"]] for q in from_index] == [[h["id"] for h in q["results"]] for q in hits48]


def test_eval_warns_once_per_model_for_untrained_dims_and_depths(exports, fmnist_data, tmp_path, capfd):
    out = tmp_path / "r.json"
    local = {kind: f"local-dir:{folder}" for kind, folder in exports.items()}
    capfd.readouterr()
    run_verb("eval", "zeroshot", "--model", local["mrl"], "--compare", local["standard"], "--compare", local["bare"],
             "--data", fmnist_data["eval"], "--dims", "48,64,256", "--image-layers", "3", "--batch-size", 500,
             "--output", out)
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 3, lines  # one per model
    mrl, standard, bare = lines
    assert mrl.startswith(f"warning: {local['mrl']} was not trained at dim 48 (trained: {TRAINED}); image depth 3 "
                          "(trained: 2,4)"), mrl
    assert standard.startswith(f"warning: {local['standard']} was trained without") and "dims 48,64" in standard
    assert bare.startswith(f"warning: {local['bare']} records no") and "image depth 3 (trained: 4)" in bare
    results = list(json.loads(out.read_text())["models"].values())
    assert len(results) == 3 and all(r["grid"] == results[0]["grid"] for r in results)  # same weights, same numbers


def test_eval_reads_a_training_checkpoints_dims(fmnist_data, tmp_path, capfd):
    """A checkpoint holding RunState's "dims" (what the trainer's step_N.pt holds beside open_clip's state_dict)
    counts as an export's record."""
    import open_clip
    import torch

    torch.manual_seed(0)
    checkpoint = tmp_path / "step_1.pt"
    torch.save({"step": 1, "dims": TINY_DIMS, "layers": {}, "state_dict": open_clip.create_model(TINY).state_dict()},
               checkpoint)
    capfd.readouterr()
    run_verb("eval", "zeroshot", "--model", TINY, "--pretrained", checkpoint, "--data", fmnist_data["eval"],
             "--dims", "48,256", "--batch-size", 500)
    lines = warnings_in(capfd.readouterr().err)  # the name without it: test_embed_warns_once_per_case_...
    assert len(lines) == 1 and lines[0].startswith(f"warning: {TINY} --pretrained {checkpoint} was not trained at "
                                                   f"dim 48 (trained: {TRAINED})"), lines


def test_truncate_shares_the_rule_and_its_output_keeps_what_is_known(exports, image_folder, tmp_path, capfd):
    capfd.readouterr()
    run_verb("truncate", "--model", f"local-dir:{exports['standard']}", "--dim", 64, "--out", tmp_path / "std64")
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1 and "was trained without Matryoshka nesting" in lines[0], lines
    run_verb("truncate", "--model", f"local-dir:{exports['bare']}", "--dim", 64, "--out", tmp_path / "bare64")
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1 and "records no Matryoshka nesting" in lines[0], lines
    # a cut of a standard model is standard at its new width; a cut of an unknown one stays unknown
    _, lines = embed(f"local-dir:{tmp_path / 'std64'}", image_folder, tmp_path / "s.npz", 32, capfd)
    assert len(lines) == 1 and "was trained without Matryoshka nesting (matryoshka_dimensions [64])" in lines[0]
    cut, lines = embed(f"local-dir:{tmp_path / 'bare64'}", image_folder, tmp_path / "b.npz", 32, capfd)
    assert len(lines) == 1 and "records no Matryoshka nesting" in lines[0], lines
    assert cut.meta["nesting"] == {}
