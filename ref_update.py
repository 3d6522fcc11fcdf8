"""The paper's contribution: the reference model moves (Gorbatovski et al. 2024, "Learn Your Reference Model").

One rule, two readings. Every `tau` optimizer steps the reference is mixed towards the policy with weight `alpha`:

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref

  - soft update (TR-X^alpha):  --alpha 0.6             every step (tau = 1): an exponential moving average whose
                                                       lag behind the policy is (1 - alpha) / alpha steps
  - hard update (TR-X^tau):    --tau 512               alpha = 1: theta_ref <- theta every 512 steps, lag ~tau / 2
  - TRL's reading of Table 1:  --alpha 0.6 --tau 512   a partial copy every 512 steps
  - vanilla DPO/IPO/KTO is alpha = 0 (or tau = infinity): the reference never moves.

Naming trap: in RL code (cleanrl, DDPG) `tau` is the mixing weight; in this paper `tau` is the period and `alpha`
the weight. alpha is the weight of the *policy*.
"""
from dataclasses import dataclass, replace

import torch

from flags import at_least, in_range
from fsdp import local_shard


def should_update(step, tau):
    """True after optimizer step `step` (counted from 1) when the reference is due; micro-steps do not count."""
    return step % tau == 0


@torch.no_grad()
def update_reference(reference, policy, alpha):
    """In place: theta_ref <- alpha * theta + (1 - alpha) * theta_ref, over all tensors in one fused call.

    `policy` may be wrapped in DDP (its replicas are identical, so every rank updates its own reference with no
    communication) or sharded with FSDP2 (both models sharded alike: the update is shard-local, no all-gather).
    Keep the reference in fp32 even when the policy trains in bf16: with alpha = 0.01 a bf16 lerp rounds each
    small step away and the reference stalls; tests/test_ref_update.py shows both.
    """
    policy = getattr(policy, "module", policy)  # unwrap DDP
    ref_params = [local_shard(r) for r in reference.parameters()]  # parameters(): a tied tensor once, not twice
    policy_params = [local_shard(p).to(r.dtype) for r, p in zip(ref_params, policy.parameters())]  # upcast bf16
    if alpha == 1:  # hard update: an exact copy, bit for bit
        torch._foreach_copy_(ref_params, policy_params)
    else:
        # TR soft update (Gorbatovski et al.): theta_ref <- theta_ref + alpha * (theta - theta_ref)
        torch._foreach_lerp_(ref_params, policy_params, alpha)


@dataclass(frozen=True)
class Rule:
    """A TR run's rule: its flags, when the reference moves, with what weight, and how to say it. train.py reads it
    from here and `apply` records each update it made in the run's log, where plot.py and evaluate.py read what
    happened; a new rule (say, alpha decaying over the run, or a copy when a measured drift passes a threshold) is a
    change to this class, plus the declaration in metrics.py of any measurement it logs."""
    alpha: float  # the policy's weight in each update
    tau: int  # the period, in optimizer steps
    horizon: int = None  # the run's length in optimizer steps, once known (train.py: after the data is read)

    FLAGS = ("alpha", "tau")  # train.py's flags that belong to the rule (add_flags); only the TR methods take them

    @staticmethod
    def add_flags(parser):
        """The rule's flags, each with its domain (flags.py). One that makes the rule depend on the run's length
        (say, alpha decaying over the run) is marked with flags.run_length: a resume may then not change its length."""
        parser.add_argument("--alpha", type=in_range(0.0, 1.0), default=None, help="TR: the policy's weight in each "
                            "reference update, in [0, 1]. Alone: the soft update, read as every step (tau 1; the paper "
                            "leaves it open). With --tau: a mix every tau steps (TRL's reading)")
        parser.add_argument("--tau", type=at_least(1), default=None, help="TR: update the reference every tau "
                            "optimizer steps. Alone: the paper's hard update, a copy (alpha 1). Neither flag: --tau "
                            "16, sized for the demo (the paper: 512)")

    @staticmethod
    def of_args(parser, args):
        """The rule train.py's flags ask for, or None where the method's reference never moves (not a TR method),
        which refuses the rule's flags."""
        if args.method.startswith("tr_"):
            return Rule.of_flags(args.alpha, args.tau)
        given = [f"--{name}" for name in Rule.FLAGS if getattr(args, name) != parser.get_default(name)]
        if given:
            tr = [m for a in parser._actions if a.dest == "method" for m in a.choices or () if m.startswith("tr_")]
            parser.error(f"{'/'.join(given)} move the reference, which only the TR methods do ({', '.join(tr)}), not "
                         f"--method {args.method}")
        return None

    @staticmethod
    def of_flags(alpha, tau):
        """The rule --alpha and --tau ask for (None where a flag is not given)."""
        if alpha is None and tau is None:
            return Rule(alpha=1.0, tau=16)  # a hard copy every 16 steps, sized for the demo (the paper's runs: 512)
        if tau is None:
            return Rule(alpha=alpha, tau=1)  # --alpha alone: the soft update, read as every step (the design card's)
        if alpha is None:
            return Rule(alpha=1.0, tau=tau)  # --tau alone: the paper's hard update, a copy every tau steps
        return Rule(alpha=alpha, tau=tau)  # both: TRL's reading, a mix every tau steps

    def over(self, steps):
        """The same rule, for a run of `steps` optimizer steps."""
        return replace(self, horizon=steps)

    def in_force(self):
        """What args.json keeps of the rule as it runs (its flags' values after the readings above)."""
        return {name: getattr(self, name) for name in Rule.FLAGS}

    @staticmethod
    def of_run(run):
        """The rule a run trained with (its args.json: the rule's flags as in force, and max_steps), or None for a
        vanilla method."""
        if not run["method"].startswith("tr_"):
            return None
        return Rule(**{name: run[name] for name in Rule.FLAGS}, horizon=run.get("max_steps"))

    def due(self, step):
        return should_update(step, self.tau)

    def apply(self, step, reference, policy, record, log):
        """After optimizer step `step`: the update where it is due, and what the run records of it, [step, weight]
        appended to record["ref_updates/applied"] (train.py's next log record: plot.py and evaluate.py read the
        updates there, never from the rule). A rule that depends on a measurement of the step takes it from the models
        given here and writes it into `record` under a key metrics.py declares. Returns the updates applied, 0 or 1."""
        applied = record.setdefault("ref_updates/applied", [])  # [] where none was due: recorded as none
        if not self.due(step):
            return 0
        update_reference(reference, policy, self.weight(step))
        applied.append([step, self.weight(step)])
        if not self.every_step:  # (every step: the log lines' ref_updates count them)
            log(f"step {step}: reference updated: " +
                ("a copy of the policy" if not self.mixes else f"alpha {self.weight(step):g}"))
        return 1

    def weight(self, step):
        """alpha at optimizer step `step`: the same at every step."""
        return self.alpha

    @property
    def every_step(self):
        """Whether the rule moves the reference after every step (the soft update's reading)."""
        return self.tau == 1

    @property
    def mixes(self):
        """Whether an update is ever a mix rather than a copy: a mix needs an fp32 reference (a bf16 lerp stalls)."""
        return self.alpha != 1

    def moves(self):
        """Whether the reference moves at all over the run (else the run is the vanilla one), and if not, why."""
        if self.alpha == 0:
            return False, "alpha is 0"
        if self.horizon < self.tau:
            return False, f"{self.horizon} steps < tau {self.tau}"
        return True, ""

    def __str__(self):
        """The rule in a line, for train.py's start-up line (what happened is the run's record: `recorded`)."""
        every = "every step" if self.every_step else f"every {self.tau} steps"
        if not self.mixes:
            return f"hard update: reference <- policy {every}"
        lag = (f" (lags the policy by {(1 - self.alpha) / self.alpha:.3g} steps)" if self.every_step and self.alpha
               else "")
        return (f"{'soft update every step: ' if self.every_step else ''}reference <- {self.alpha:g} policy + "
                f"{1 - self.alpha:g} reference{'' if self.every_step else ' ' + every}{lag}")


def recorded(updates, steps):
    """The reference updates a run recorded ([step, weight] each, as Rule.apply writes them) over its first `steps`
    steps, in a few words, for a run's name in plot.py's and evaluate.py's legends."""
    moved = [(s, w) for s, w in updates if w > 0 and s <= steps]  # alpha 0 applies an update that moves nothing
    if not moved:
        return "the reference never moved"
    weights = sorted({w for _, w in moved})
    gaps = {b - a for a, b in zip([0] + [s for s, _ in moved], [s for s, _ in moved])}
    what = ("copy" if weights == [1] else f"alpha {weights[0]:g}" if len(weights) == 1 else
            f"alpha {weights[0]:g}-{weights[-1]:g}")
    if len(moved) == steps:  # after every step
        return f"{what} every step" if weights == [1] else f"soft, {what} every step"
    if len(gaps) == 1:
        return f"hard copy every {gaps.pop()}" if weights == [1] else f"{what} every {gaps.pop()}"
    return f"{len(moved)} updates ({what})"
