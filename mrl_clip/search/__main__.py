import sys

from ..errors import run_cli
from .main import main

sys.exit(run_cli(main))
