"""What each flag may hold, declared beside the flag: argparse's own `type=`, so that a value outside it is refused by
argparse before anything loads, in one sentence that names the flag (`error: argument --tau: 0 must be at least 1`).

    p.add_argument("--tau", type=at_least(1), ...)                        # an int, 1 or more
    p.add_argument("--max_grad_norm", type=at_least(0.0, zero="no clipping"), ...)  # 0 means something: say what
    p.add_argument("--label_smoothing", type=in_range(0.0, 0.5), ...)      # [0, 0.5)
    p.add_argument("--model", type=text("a model: built-in, folder, .json, .gguf or hub id"), ...)  # checked where used

Every flag of every entry point has one (tests/test_flags.py tries 0, a negative, an absurd value, an integer beyond
64 bits (of an integer flag) and the wrong type on each, and train.py's accepted values on a model with learned
positions). A flag whose meaning depends on the run's length (a schedule over the run) says so with `run_length`; a
resume may then not change the run's length (checkpoint.check_same_run).
"""
import argparse


class Domain:
    """An argparse type: converts the command line's text with `kind`, refuses what `ok` refuses, says `text`."""

    def __init__(self, kind, ok, text, probes=None):
        beyond = (str(2**64),) if kind is int else ()  # beyond 64 bits: what torch cannot take (a seed, an index)
        self.kind, self.ok, self.text = kind, ok, text
        self.probes = ("0", "-1", "1000000000", *beyond, "x") if probes is None else probes  # what test_flags.py tries
        self.__name__ = text  # argparse names the type in some of its own messages

    def __call__(self, value):
        try:
            converted = self.kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}")
        if not self.ok(converted):
            raise argparse.ArgumentTypeError(f"{value} must be {self.text}")
        return converted


def at_least(low, zero=None):
    """A number >= low, of low's type (int or float); `zero`: what 0 means, where 0 is allowed and means something."""
    return Domain(type(low), lambda v: v >= low, f"at least {low:g}" + (f" (0: {zero})" if zero else ""))


def random_seed():
    """A seed: an int in [0, 2^32), which every generator the code seeds takes, through every formula that derives
    one from it (data.Batches: seed * 1_000_003 + epoch; evaluate.py: seed + 1)."""
    return Domain(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32 - 1")


def positive():
    """A float > 0."""
    return Domain(float, lambda v: v > 0, "positive")


def in_range(low, high, high_open=False):
    """A float in [low, high], or [low, high) with high_open."""
    return Domain(float, lambda v: low <= v < high if high_open else low <= v <= high,
                  f"in [{low:g}, {high:g}{')' if high_open else ']'}")


def text(what):
    """Any text (a path, a name, an id): what it may be is checked where it is used (locate.py, sources.py)."""
    return Domain(str, lambda v: True, what, probes=())


def run_length(action, when=lambda value: True):
    """Mark a flag that makes the run depend on its length (e.g. a schedule that decays over the run) `when` its value
    does so: a resume may then not change --max_steps. Returns the argparse action."""
    action.run_length = when
    return action


def length_dependent(parser, run):
    """The flags of `parser` whose value in `run` (a run's arguments; missing ones: the defaults) ties it to its
    length."""
    return [a.dest for a in parser._actions
            if hasattr(a, "run_length") and a.run_length(run.get(a.dest, a.default))]
