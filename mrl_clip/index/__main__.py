import sys

from ..errors import run_cli
from ..search.build import main

sys.exit(run_cli(main))
