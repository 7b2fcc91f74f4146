"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
import sys


class UserError(Exception):
    """A mistake in what the user asked for (bad flag, missing file, unknown model)."""


def run_cli(main, argv=None):
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
