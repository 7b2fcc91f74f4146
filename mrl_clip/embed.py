"""`python -m mrl_clip.embed`: the short command for mrl_clip.search.embed, where the code lives."""
import sys

from .errors import run_cli
from .search.embed import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
