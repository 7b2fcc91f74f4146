"""The trainer's contract: what loop.py needs from an engine (Engine), and what a run's state is (RunState).

plain_engine.PlainEngine (one process or DDP) and deepspeed_engine.DeepSpeedEngine satisfy Engine; loop.py calls
nothing else on them. RunState is the checkpoint record beside the weights and optimizer, written and read here
only: a plain run keeps it in checkpoints/step_N.pt (open_clip's format: open_clip_train resumes from "epoch" and
"state_dict" and ignores the rest), a DeepSpeed run in its engine's client state.
"""
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ContextManager, Optional, Protocol, runtime_checkable

from ..errors import UserError
from .finetune import lock_record
from .layered import record as layered_record

LOGIT_SCALE_MAX = math.log(100)  # open_clip's clamp: a temperature no lower than 1/100
# what only an exact resume needs: the streams' positions, the skipped-step count, the last step validated
RESUME_FIELDS = ("data", "nonfinite", "validated_step")


@dataclass
class RunState:
    """Where a run stands and what it is (the flags a resume must agree with)."""
    step: int
    epoch: int = 0
    name: Optional[str] = None
    model: Optional[str] = None
    dims: Optional[list] = None
    dim_weights: Optional[list] = None
    world_size: int = 1
    seed: int = 0
    data: list = field(default_factory=list)        # every rank's StreamPosition.state_dict(), in rank order
    nonfinite: dict = field(default_factory=dict)   # NonFiniteSteps.state_dict()
    locks: str = ""                                 # finetune.lock_record: the --lock-* flags
    siglip: Optional[bool] = None                   # None: not recorded (another trainer's checkpoint)
    validated_step: Optional[int] = None
    deterministic_towers: Optional[bool] = None     # --deterministic-towers (None: not recorded, i.e. off)
    layers: dict = field(default_factory=dict)      # layered.record: the 2D flags ({}: not a 2D run)

    @classmethod
    def of_args(cls, args, step: int = 0, **progress) -> "RunState":
        """The state of a run of these flags at `step` (`progress`: epoch, data, nonfinite, validated_step)."""
        return cls(step=step, name=args.name, model=args.model, dims=args.dims, dim_weights=args.dim_weights,
                   world_size=args.world_size, seed=args.seed, locks=lock_record(args), siglip=args.siglip,
                   deterministic_towers=bool(getattr(args, "deterministic_towers", False)),
                   layers=layered_record(args), **progress)

    def to_dict(self, resume: bool = True) -> dict:
        """The checkpoint's keys; without `resume`, the run's description only (an exported open_clip checkpoint)."""
        record = asdict(self)
        return record if resume else {k: v for k, v in record.items() if k not in RESUME_FIELDS}

    @classmethod
    def from_dict(cls, record: dict) -> "RunState":
        """The state a checkpoint holds (other keys, such as the weights, are left out; missing ones default)."""
        state = cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})
        state.step = int(state.step)
        return state

    def check_resumes(self, path, saved: "RunState") -> None:
        """One line when `saved` (read from `path`) is not a checkpoint of this run's dims, locks and loss."""
        if saved.dims not in (None, self.dims):
            raise UserError(f"{path} was trained with --dims {saved.dims}, not {self.dims}")
        # the optimizer state holds the trainable parameters only
        if saved.locks != self.locks:
            raise UserError(f"{path} was trained with lock flags '{saved.locks or 'none'}', not "
                            f"'{self.locks or 'none'}': resume with the same --lock-* flags")
        if bool(saved.deterministic_towers) != bool(self.deterministic_towers):
            flag = "with" if saved.deterministic_towers else "without"
            raise UserError(f"{path} was trained {flag} --deterministic-towers: resume it {flag} it (it decides the "
                            "training transform and the locked towers' mode)")
        if (saved.layers or {}) != self.layers:
            raise UserError(f"{path} was trained with 2D flags {saved.layers or 'none'}, not {self.layers or 'none'}: "
                            "resume with the same --image-layers / --text-layers and their weights")
        # a SigLIP run's model has a logit_bias, a CLIP run's has none
        if saved.siglip != self.siglip:
            raise UserError(f"{path} was trained {'with' if saved.siglip else 'without'} --siglip: resume it "
                            f"{'with' if saved.siglip else 'without'} --siglip")


@runtime_checkable
class Engine(Protocol):
    """What loop.train_step, loop.save and validate call. A step is zero_grad, one forward and backward per
    --accum-freq batch (under no_sync(last=...)), then step(); checkpoints are the engine's own format."""

    def __call__(self, images, texts) -> tuple:
        """(image features, text features, exp(logit_scale)[, logit_bias]) of the model in training."""

    def train(self) -> None: ...

    def eval_model(self):
        """What validation encodes with (encode_image, encode_text, eval) on rank 0."""

    def no_sync(self, last: bool) -> ContextManager:
        """Around each pass of a step: gradients are reduced across ranks on the `last` only."""

    def zero_grad(self) -> None: ...

    def backward(self, loss) -> None: ...

    def step(self) -> bool:
        """The optimizer step; False when a gradient was not finite and nothing changed (on every rank)."""

    def save_checkpoint(self, checkpoint_dir: Path, state: RunState, keep: int) -> None:
        """A checkpoint of the weights, the optimizer and `state` at state.step; the newest `keep` are kept."""

    def load_checkpoint(self, resume: Optional[str], checkpoint_dir: Path, run: RunState) -> tuple:
        """(the RunState resumed from, or None for a fresh start; whether the RNG state was restored) for
        --resume ('latest' or a path), after checking it is a checkpoint of `run` (RunState.check_resumes)."""

    def last_checkpoint(self, checkpoint_dir: Path) -> Optional[Path]: ...

    def export_model(self, checkpoint_dir: Path, step: int):
        """The trained open_clip model (rank 0, after the last save)."""
