"""`python -m mrl_clip.convert_deepspeed`: the short command for mrl_clip.train.convert_deepspeed, where the code
lives."""
import sys

from .errors import run_cli
from .train.convert_deepspeed import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
