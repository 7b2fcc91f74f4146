"""User mistakes get one line on stderr and exit code 2, never a traceback."""
import pytest
import torch

from .conftest import TINY, run_module


def foreign_checkpoint(tmp):
    """An open_clip-format checkpoint whose weights belong to some other network."""
    path = tmp / "foreign.pt"
    if tmp.is_dir():
        torch.save({"epoch": 1, "state_dict": {"fc.weight": torch.zeros(3, 4)}}, path)
    return str(path)


def bad_inputs(data, tmp):
    train = ["mrl_clip.train", "--model", TINY, "--train-data", data["train"], "--logs", tmp]
    zeroshot = ["mrl_clip.eval", "zeroshot", "--model", TINY, "--data", data["eval"]]
    return {
        "dims not increasing": (train + ["--dims", "64,32,256"], "strictly increasing"),
        "dims zero": (train + ["--dims", "0,256"], "positive"),
        "dims above width": (train + ["--dims", "8,512"], "above the embedding width"),
        "dims not ending at width": (train + ["--dims", "8,128"], "must end at the embedding width"),
        "dims not numbers": (train + ["--dims", "8,abc"], "comma-separated integers"),
        "unknown model": (["mrl_clip.train", "--model", "ViT-Nope", "--train-data", data["train"],
                           "--dims", "256"], "unknown model"),
        "missing shards": (["mrl_clip.train", "--model", TINY, "--train-data", str(tmp / "x-{0000..0003}.tar"),
                            "--dims", "256"], "missing shard"),
        "resume missing": (train + ["--dims", "256", "--resume", str(tmp / "nope.pt")], "not found"),
        "missing flag": (["mrl_clip.train", "--model", TINY], "required"),
        "eval data missing": (["mrl_clip.eval", "zeroshot", "--model", TINY, "--data", str(tmp / "none")],
                              "not found"),
        "eval dims above width": (zeroshot + ["--dims", "8,1024"], "above"),
        "eval checkpoint missing": (zeroshot + ["--pretrained", str(tmp / "missing.pt")], "not found"),
        "eval folder not wds": (["mrl_clip.eval", "zeroshot", "--model", TINY, "--data", str(tmp)],
                                "nshards.txt"),
        "eval unknown task": (["mrl_clip.eval", "bogus"], "invalid choice"),
        "eval checkpoint of another model": (zeroshot + ["--pretrained", foreign_checkpoint(tmp)], "does not fit"),
    }


CASES = list(bad_inputs({"train": "T", "eval": "E"}, __import__("pathlib").Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case, fmnist_data, tmp_path):
    args, expected = bad_inputs(fmnist_data, tmp_path)[case]
    result = run_module(*args, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_shards_with_no_usable_sample_stop_with_a_message(tmp_path):
    from pipelines.shards import write_shards

    samples = ({"__key__": f"s{i}", "png": b"broken", "txt": "a caption"} for i in range(20))
    write_shards(samples, tmp_path, "train", shard_size=10)
    result = run_module("mrl_clip.train", "--model", TINY, "--train-data", tmp_path / "train-{0000..0001}.tar",
                        "--dims", "256", "--batch-size", "4", "--workers", "0", "--logs", tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no usable sample" in result.stderr and "Traceback" not in result.stderr
