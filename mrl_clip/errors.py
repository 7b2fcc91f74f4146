"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
import argparse
import sys


class UserError(Exception):
    """A mistake in what the user asked for (bad flag, missing file, unknown model)."""


class TrainingHalted(UserError):
    """A run stopped by one of its guards (too much bad data, a loss that stays non-finite): exit code 3, so a
    scheduler can tell it from a bad command (2) and not requeue it blindly."""
    exit_code = 3


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one line) rather than usage text plus an error."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def run_cli(main, argv=None):
    try:
        return main(argv)
    except UserError as err:
        close_progress_bars()  # the error line starts a line of its own, not the end of a bar's
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def not_a_command(verb: str):
    """What a module that is no command of its own says when run with python -m (the package has one entry point)."""
    print(f"error: this module is not a command; run: python -m mrl_clip {verb} ...", file=sys.stderr)
    sys.exit(2)
