"""Run guards: what keeps a long run honest when something goes wrong. None of it is the method; train.py calls each
piece once, by name.

- Flags no run can use are refused before anything loads (`check_flags`); those the model cannot take once its
  config is read (model.check_model_flags).
- A user's mistake is one sentence: every entry point calls `report_user_errors()`, and a UserError that reaches
  the top prints as `error: <message>` on stderr, on a line of its own (after any progress bar), exit status 1.
  Any other exception keeps its traceback: that is a bug.
- Stop signals (`StopSignals`): SIGTERM or Ctrl-C finishes the current optimizer step, saves and exits STOPPED (75,
  sysexits' EX_TEMPFAIL: stopped early, resumable; a run that reached its last step exits 0).
- Non-finite steps (`check_finite`): never applied; the run stops with the rows that produced them, or skips them.
- Replicas (`check_replicas`): DDP ranks must end bit-identical.
- Rank 0 first (`rank_zero_first`): what rank 0 does before the others (loading the data, checking it) fails on
  rank 0 alone, in one sentence; the other ranks then exit 1 without a word (not a gloo traceback each).
- The exit (`finish`): around a gloo bug at interpreter shutdown.
"""
import contextlib
import hashlib
import math
import os
import signal
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input (a flag, a data file, a model, a checkpoint): the message says what, where, and what to do."""


def report_user_errors():
    """Install the hook that prints a UserError as one line instead of a traceback."""
    def hook(kind, error, traceback):
        if not issubclass(kind, UserError):
            return sys.__excepthook__(kind, error, traceback)
        say(f"error: {error}")
    sys.excepthook = hook


def say(message):
    """A line on stderr that clears a progress bar first: the message gets its own line, not the bar's."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


def fail(message):
    """Stop the run, exit status 1: a failure of the run, not of its input (those are UserErrors)."""
    say(f"error: {message}")
    raise SystemExit(1)


def check_flags(parser, args, method):
    """train.py's flag values that no run can use together, each refused by argparse with the flags' names (status 2).
    Each flag's own domain is declared beside it (flags.py) and argparse has checked it already."""
    from losses import METHODS
    for other, (*_, flags) in METHODS.items():  # a loss's own option given to another method
        for name, (default, _, _) in flags.items():
            if other != method and getattr(args, name) != default:
                parser.error(f"--{name} is an option of --method {other} and tr_{other}, not of {args.method}")
    if args.ipo_average and method != "ipo":
        parser.error(f"--ipo_average is an option of --method ipo and tr_ipo, not of {args.method}")
    if method == "kto" and args.kto_lambda_d == args.kto_lambda_u == 0:
        parser.error("--kto_lambda_d and --kto_lambda_u are both 0: the loss would be 0 and nothing would train")
    if method == "kto" and args.batch_size < 2:
        parser.error("KTO estimates its KL on mismatched pairs, each prompt with the next pair's completions: "
                     "--batch_size must be at least 2")
    if args.max_prompt_length >= args.max_length:
        parser.error(f"--max_prompt_length {args.max_prompt_length} must be less than --max_length {args.max_length}")


STOPPED = 75  # the exit status of a run stopped by a signal before its last step: continue it with --resume


class StopSignals:
    """SIGTERM (a scheduler's `scancel`, a preemption) or SIGINT (Ctrl-C) asks the run to stop after the current
    optimizer step, save, and exit STOPPED. Under plain `python` a second Ctrl-C stops at once, unless a checkpoint is
    being written. Under torchrun a second signal never stops a worker: Ctrl-C in a terminal reaches every process of
    the group, and torchrun forwards the same signal again, so each worker gets two at once. torchrun itself kills its
    workers `--shutdown-timeout` seconds (default 30) after it got the signal, and exits 1 (see DESIGN.md)."""

    def __init__(self, under_torchrun):
        self.requested, self.saving, self.under_torchrun = False, False, under_torchrun
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and not (self.under_torchrun or self.saving):
            raise KeyboardInterrupt
        self.requested = True


def check_finite(step, totals, places, skipped, limit, save, log):
    """A step whose loss or gradient norm (`totals`, the step's sums over ranks) is NaN or inf is never applied.
    Returns True to skip it (at most `limit` in a run, and never once a signal asked the run to stop: a run that skips
    every step must still stop); otherwise saves the last good state and stops, naming every row of the step (`places`,
    this rank's; every rank's are gathered). Every rank calls it with the same numbers, so all ranks decide alike."""
    loss, grad_norm = totals["loss"], totals["grad_norm"]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return False
    if dist.is_initialized():  # every rank's rows, in every rank's message
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, places)
        places = sum(gathered, [])
    message = f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}; rows {places}"
    if skipped < limit and not totals["stop"]:
        log(f"warning: skipped {message} ({skipped + 1} of at most {limit}, --skip_nonfinite)")
        return True
    final = save()  # the weights are still those of the last good step
    if totals["stop"]:
        say(f"stopped by a signal at non-finite {message}, not applied; saved {final}: continue with --resume")
        finish(STOPPED)
    fail(f"non-finite {message}. Saved the last good state, {final}. Check those rows; then continue the run with "
         "--resume --skip_nonfinite N (steps like this one skipped, their batches lost; a resume keeps --lr), or train "
         f"with a lower --lr afresh from --model {final}/policy into another --out_dir (the reference, the optimizer "
         "and the schedule start over, the reference from that policy, not from the SFT model).")


def check_replicas(models, log):
    """DDP replicas must end identical, bit for bit: the same averaged gradients, and each rank moved its reference
    alike. A sha256 of every parameter, compared over the ranks."""
    digest = hashlib.sha256()
    for t in (t for m in models if m is not None for t in m.parameters()):
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        fail(f"the replicas diverged: parameter sha256 per rank {digests}")
    log(f"policy and reference sha256 {digests[0][:16]} identical on all {len(digests)} ranks")


@contextlib.contextmanager
def rank_zero_first():
    """Under torchrun, rank 0 runs the block first, then the other ranks (they read what rank 0 cached). If the block
    raises on rank 0 (bad data, a refused resume), rank 0 says why and exits 1 first, so that torchrun reports it as
    the root cause; the other ranks, told by a broadcast where they wait, exit 1 without a word (not with the gloo
    traceback of a collective that broke when rank 0 left)."""
    if not dist.is_initialized():
        yield
        return
    failed = [False]
    if dist.get_rank() != 0:
        dist.broadcast_object_list(failed, src=0)
        if failed[0]:
            try:
                dist.barrier()  # rank 0 never joins: this returns when it has exited (or torchrun ends this process)
            finally:
                os._exit(1)
        yield
        return
    try:
        yield
    except BaseException:
        sys.excepthook(*sys.exc_info())  # one sentence for a UserError, the traceback of a bug
        dist.broadcast_object_list([True], src=0)
        finish(status=1)
    dist.broadcast_object_list(failed, src=0)


def finish(status=0):
    """End the process with exit `status`. A torchrun worker leaves without the interpreter's shutdown: a gloo worker
    thread can still be releasing the last collective's tensors, which takes the GIL; once Python is shutting down
    that aborts the process ("terminate called without an active exception", 1 run in 20 here). All is saved and
    closed by now."""
    if not dist.is_initialized():
        sys.exit(status)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
