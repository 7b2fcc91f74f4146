"""--torchcompile: open_clip_train's flag. open_clip_train runs `torch.compile(model)` and saves the original
module's state_dict (keys without the compiled wrapper's `_orig_mod.`); here the module compiles itself in place
(nn.Module.compile: torch.compile of its call, default inductor backend), so the model the engines, checkpoints and
exports hold is the plain open_clip module, and a resume loads into it as into an eager run."""


def add_flags(p) -> None:
    p.add_argument("--torchcompile", action="store_true",
                   help="torch.compile the model's training forward (inductor; the first steps pay the compile time)")


def apply(model, args) -> None:
    if args.torchcompile:
        model.compile()
