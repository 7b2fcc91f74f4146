"""The trainer's contract (mrl_clip.train.engine): both engines make the calls the Engine protocol names, with its
parameters, and RunState writes and reads the checkpoint record a run resumes from."""
import inspect

import pytest
import torch

from mrl_clip.errors import UserError
from mrl_clip.train.deepspeed_engine import DeepSpeedEngine
from mrl_clip.train.engine import Engine, RunState
from mrl_clip.train.plain_engine import PlainEngine

from .test_distributed import Towers

PROTOCOL_CALLS = [name for name in vars(Engine) if not name.startswith("_")] + ["__call__"]


@pytest.mark.parametrize("engine_class", [PlainEngine, DeepSpeedEngine])
def test_each_engine_takes_the_protocols_calls_with_its_parameters(engine_class):
    """runtime_checkable isinstance looks at names only; the parameters are compared here (a real DeepSpeedEngine
    is checked with isinstance in tests/ds_nonfinite_probe.py, which builds one)."""
    assert {"zero_grad", "no_sync", "backward", "step", "save_checkpoint", "load_checkpoint", "last_checkpoint",
            "export_model", "train", "eval_model", "__call__"} <= set(PROTOCOL_CALLS)
    for name in PROTOCOL_CALLS:
        wanted = list(inspect.signature(getattr(Engine, name)).parameters)
        assert list(inspect.signature(getattr(engine_class, name)).parameters) == wanted, name


def test_a_plain_engine_is_an_engine():
    model = Towers()
    engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler(enabled=False))
    assert isinstance(engine, Engine)
    assert not isinstance(object(), Engine)


# the keys mrl_clip.train has written beside open_clip's ("epoch", "name", "state_dict", "optimizer") since
# exact resumes came in: checkpoints written before this module existed must still resume
CHECKPOINT_KEYS = ["step", "epoch", "name", "model", "dims", "dim_weights", "world_size", "seed", "data",
                   "nonfinite", "locks", "siglip", "validated_step", "deterministic_towers", "layers"]


def a_record():
    return {"step": 12, "epoch": 1, "name": "run", "model": "MRL-Tiny-28", "dims": [8, 256], "dim_weights": [1.0, 1.0],
            "world_size": 1, "seed": 3, "data": [{"epoch": 1, "batches": 2, "read_before": 64, "bad_before": 0,
                                                 "workers": 1, "consumed": {0: 64}, "bad": {0: 0}}],
            "nonfinite": {"in_row": 0, "total": 1, "first_in_row": None}, "locks": "", "siglip": False, "validated_step": 10,
            "deterministic_towers": False, "layers": {}}


def test_run_state_reads_and_writes_the_checkpoint_record():
    checkpoint = {**a_record(), "state_dict": {}, "optimizer": {}, "rng": []}
    state = RunState.from_dict(checkpoint)
    assert list(state.to_dict()) == CHECKPOINT_KEYS
    assert state.to_dict() == a_record()
    described = state.to_dict(resume=False)
    assert list(described) == [k for k in CHECKPOINT_KEYS if k not in ("data", "nonfinite", "validated_step")]
    # an older record without the resume keys reads with fresh ones
    old = RunState.from_dict({k: v for k, v in a_record().items() if k not in ("data", "nonfinite", "locks")})
    assert old.data == [] and old.nonfinite == {} and old.locks == ""


def test_a_resume_must_agree_on_dims_locks_and_loss():
    run = RunState.from_dict(a_record())
    run.check_resumes("ckpt", RunState.from_dict(a_record()))
    for change, message in [({"dims": [16, 256]}, "--dims"), ({"locks": "image"}, "lock flags"),
                            ({"siglip": True}, "--siglip"),
                            ({"layers": {"text_layers": [1, 2], "image_layers": None}}, "2D flags")]:
        with pytest.raises(UserError, match=message):
            run.check_resumes("ckpt", RunState.from_dict({**a_record(), **change}))
