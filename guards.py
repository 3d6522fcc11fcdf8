"""Run guards: what keeps a run honest when something goes wrong. A user's mistake is one sentence, not a traceback.

Every entry point (train.py, evaluate.py, data.py, plot.py, toy.py, bench.py) calls `report_user_errors()` once:
a UserError that reaches the top is printed as `error: <message>` on stderr, on a line of its own (after any
progress bar), and the process exits with status 1. Any other exception keeps its traceback: that is a bug.
"""
import sys


class UserError(Exception):
    """Bad input (a flag, a data file, a model, a checkpoint): the message says what, where, and what to do."""


def report_user_errors():
    """Install the hook that prints a UserError as one line instead of a traceback."""
    def hook(kind, error, traceback):
        if not issubclass(kind, UserError):
            return sys.__excepthook__(kind, error, traceback)
        from tqdm import tqdm
        tqdm.write(f"error: {error}", file=sys.stderr)  # clears a progress bar first: the message gets its own line
    sys.excepthook = hook
