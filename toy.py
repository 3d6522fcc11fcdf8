"""A toy in the spirit of the paper's Fig. 2 (overoptimization), with exact probabilities, on a CPU in seconds.

    python toy.py                       # 15 runs (DPO/IPO/KTO x vanilla, soft, hard), table + toy.png
    python toy.py --seed 1 --out toy_seed1.png

The setting is small enough to enumerate, so every figure is exact, not sampled:
  - sequences: vocabulary of V=4 tokens, length L=3, so 64 sequences and no prompt (one empty context).
  - policy: a tabular autoregressive model, pi(y_t | y_<t) = softmax(logits[prefix]), one row of 4 logits per
    prefix (1 empty + 4 + 16 = 21 rows, 84 numbers). log pi(y) is a sum of 3 table look-ups.
  - SFT reference: maximum likelihood on N_SFT=24 sequences drawn uniformly (seed), with add-SMOOTH counts per
    (prefix, token): peaked on its data as a fine-tuned LM is, yet no sequence has probability 0 (finite KL).
  - preferences: N_PAIRS=6 pairs over 12 distinct sequences sampled from the SFT model (as completions are in
    practice); the first 6 are chosen, the last 6 rejected (the labels are arbitrary: what matters is where the mass
    goes). OOD = the 52 sequences in no pair. The losses and the reference rule are the project's own, imported.
Seed 0 unless --seed. These are our design choices; the paper's exact toy setup is not in our notes (PAPER.md sec. 4).

A table cannot generalise: a gradient on one sequence moves only the rows on its own path. --width W swaps it for a
small network whose parameters all prefixes share (NeuralPolicy), as an LM's are, trained as the SFT model by
maximum likelihood on the same N_SFT sequences; --sweep runs widths 2, 4, 8 x seeds 0-3 and counts outcomes.

    python toy.py --width 2 --seed 2 --out results/toy_neural.png
    python toy.py --sweep

Training is deterministic on one machine. A run that swings far (most TR runs of the network) amplifies the last bit
of a float64 sum over its 1000 steps, and PyTorch picks its vector kernels by CPU: on another CPU such a run can end
elsewhere (RESULTS.md measures how far; in the setting it checks, the vanilla runs and the runs that end on one
sequence did not move).
"""
import argparse
import copy
import itertools
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from flags import at_least, positive, random_seed, text
from guards import report_user_errors
from losses import dpo_loss, ipo_loss, kto_loss
from plot import FIGURE_TYPES
from ref_update import should_update, update_reference

V, L = 4, 3  # vocabulary, sequence length: 4**3 = 64 sequences
N_PREFIXES = sum(V ** t for t in range(L))  # 1 + 4 + 16 = 21 rows of the table
N_SFT, SMOOTH, N_PAIRS = 24, 0.1, 6


SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (64, L): sequence i is i written in base V


def all_sequences():
    """The 64 sequences, (64, L) long, in base-V order: sequence i is the base-4 writing of i."""
    return SEQUENCES


class TabularPolicy(nn.Module):
    """pi(y_t | y_<t) = softmax(logits[row of prefix y_<t]); float64 so that exact sums are exact."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(N_PREFIXES, V, dtype=torch.float64))  # (21, 4)

    def table(self):
        return self.logits


class NeuralPolicy(nn.Module):
    """pi(y_t | y_<t) = softmax(W2 tanh(W1 h)), h = P[t] + sum_{s<t} E[s, y_s]: one hidden layer over position and
    token embeddings, the same four matrices for every prefix. float64, seeded initialisation."""

    def __init__(self, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def param(*shape, scale=1.0):
            return nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=torch.float64))
        self.E, self.P = param(L * V, width), param(L, width)  # E[s * V + v]: token v at position s
        self.W1, self.W2 = param(width, 4 * width, scale=width ** -0.5), param(4 * width, V, scale=(4 * width) ** -0.5)
        # for each of the 21 prefixes, fixed 0/1 rows: its position t, and the (position, token) pairs it holds;
        # every prefix starts some sequence, so prefix_rows of all sequences names every row
        seqs = all_sequences()
        rows = prefix_rows(seqs)  # (64, L)
        positions, tokens = torch.zeros(N_PREFIXES, L, dtype=torch.float64), torch.zeros(N_PREFIXES, L * V,
                                                                                          dtype=torch.float64)
        for t in range(L):
            positions[rows[:, t], t] = 1
            for s in range(t):
                tokens[rows[:, t], s * V + seqs[:, s]] = 1
        self.register_buffer("positions", positions)
        self.register_buffer("tokens", tokens)

    def table(self):
        """The (21, V) next-token logits of every prefix, one row per prefix as in TabularPolicy."""
        return torch.tanh((self.positions @ self.P + self.tokens @ self.E) @ self.W1) @ self.W2


# row of the prefix y_<t = (V**t - 1) / (V - 1) (0, 1, 5: where prefixes of length t start) + y_<t read in base V
FIRST_ROW = torch.tensor([(V ** t - 1) // (V - 1) for t in range(L)])
DIGIT = torch.tensor([[V ** (t - 1 - s) if s < t else 0 for t in range(L)] for s in range(L)])  # y_s's weight in y_<t


def prefix_rows(seqs):
    """(N, L) tokens -> (N, L) table rows, one per prefix y_<t."""
    return FIRST_ROW + seqs @ DIGIT


def sequence_logps(policy, seqs):
    """Exact log pi(y) = sum_t log pi(y_t | y_<t) for each of the (N, L) sequences; returns (N,)."""
    return F.log_softmax(policy.table(), dim=-1)[prefix_rows(seqs), seqs].sum(-1)


def kl_exact(logp, logq):
    """KL(pi || pi_SFT) = sum over all 64 y of pi(y) (log pi(y) - log pi_SFT(y)), by enumeration: logp and logq are
    sequence_logps of the two models on all_sequences()."""
    return (logp.exp() * (logp - logq)).sum()


def make_data(seed, width=0):
    """The SFT model and the preference pairs, as indices into all_sequences(). width 0: the table, fitted in closed
    form; else NeuralPolicy(width), maximum likelihood by Adam (lr 0.01, 500 full-batch steps) on the same data."""
    g = torch.Generator().manual_seed(seed)
    sft_seqs = torch.randint(0, V, (N_SFT, L), generator=g)
    if width:
        sft = NeuralPolicy(width, seed)
        optimizer = torch.optim.Adam(sft.parameters(), lr=0.01)
        for _ in range(500):
            loss = -sequence_logps(sft, sft_seqs).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sft.requires_grad_(False)
    else:
        counts = torch.full((N_PREFIXES, V), SMOOTH, dtype=torch.float64)
        counts.index_put_((prefix_rows(sft_seqs).flatten(), sft_seqs.flatten()),
                          torch.ones(N_SFT * L, dtype=torch.float64), accumulate=True)
        sft = TabularPolicy().requires_grad_(False)
        sft.logits.copy_(counts.log())  # maximum likelihood of a softmax table: logits = log(smoothed counts)
    with torch.no_grad():
        p_sft = sequence_logps(sft, all_sequences()).exp()
    in_pairs = torch.multinomial(p_sft, 2 * N_PAIRS, replacement=False, generator=g)  # 12 distinct sequences
    return sft, in_pairs[:N_PAIRS], in_pairs[N_PAIRS:]


@torch.no_grad()
def figures(policy, sft_logps, chosen, rejected):
    """Exact p(chosen), p(rejected), p(OOD) (total mass of each set of sequences) and KL(pi || pi_SFT)."""
    logp = sequence_logps(policy, all_sequences())  # (64,)
    p = logp.exp()
    ood = torch.ones(len(p), dtype=torch.bool)
    ood[chosen], ood[rejected] = False, False
    return {"p_chosen": p[chosen].sum().item(), "p_rejected": p[rejected].sum().item(),
            "p_ood": p[ood].sum().item(), "kl": kl_exact(logp, sft_logps).item()}


def train(method, alpha, tau, sft, chosen, rejected, steps, lr, beta):
    """One run, full batch, from the SFT model. Returns (policy, reference, figures at steps 0..steps)."""
    base, moving_reference = method.removeprefix("tr_"), method.startswith("tr_")
    policy = copy.deepcopy(sft).requires_grad_(True)
    reference = copy.deepcopy(sft)  # starts as pi_SFT; TR moves it, vanilla never does
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    seqs = all_sequences()
    chosen_seqs, rejected_seqs = seqs[chosen], seqs[rejected]  # (B, L) each
    sft_logps = sequence_logps(sft, seqs)  # (64,), for the KL at every step
    history = [figures(policy, sft_logps, chosen, rejected)]
    for step in range(1, steps + 1):
        policy_c, policy_r = sequence_logps(policy, chosen_seqs), sequence_logps(policy, rejected_seqs)
        with torch.no_grad():
            ref_c, ref_r = sequence_logps(reference, chosen_seqs), sequence_logps(reference, rejected_seqs)
        if base == "kto":  # each pair gives one desirable (chosen) and one undesirable (rejected) example
            examples = torch.cat([chosen_seqs, rejected_seqs])  # (2B, L)
            # mismatched pairs as in data.py: each example's completion replaced by the next one's; with no prompt
            # that is just another data sequence, so z is the batch-mean log-ratio, as kto_loss expects
            shifted = examples.roll(-1, dims=0)
            with torch.no_grad():
                policy_kl, ref_kl = sequence_logps(policy, shifted), sequence_logps(reference, shifted)
            desirable = torch.arange(2 * len(chosen)) < len(chosen)
            losses, _ = kto_loss(torch.cat([policy_c, policy_r]), torch.cat([ref_c, ref_r]), desirable,
                                 (policy_kl - ref_kl).mean(), beta)
        else:
            losses, _, _ = {"dpo": dpo_loss, "ipo": ipo_loss}[base](policy_c, policy_r, ref_c, ref_r, beta)
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        # the paper's one line, as in train.py: every tau steps, theta_ref <- alpha * theta + (1 - alpha) * theta_ref
        if moving_reference and should_update(step, tau):
            update_reference(reference, policy, alpha)
        history.append(figures(policy, sft_logps, chosen, rejected))
    return policy, reference, history


def table_row(method, alpha, tau, history):
    """One run's line of the table `python toy.py` prints: its final figures, and where p(chosen) bottomed out."""
    pc = [h["p_chosen"] for h in history]
    low = min(range(len(pc)), key=pc.__getitem__)  # where p(chosen) bottoms out: a dip, then a recovery?
    end = history[-1]
    return (f"{method:8} {alpha or '-':>5} {tau or '-':>4} {end['p_chosen']:9.4f} {pc[low]:8.4f} {low:5d} "
            f"{end['p_rejected']:8.4f} {end['p_ood']:7.4f} {end['kl']:7.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=random_seed(), default=0, help="draws the SFT data and the pairs; training is "
                   "deterministic")
    p.add_argument("--steps", type=at_least(1), default=1000)
    # Adam moves each logit by at most ~lr per step: 0.05 x 1000 steps allows tens of nats, enough to saturate
    # vanilla DPO, while one step stays small next to the O(1) SFT logits. Chosen once, not tuned on the outcome.
    # The network's weights are O(1) and all shared: 0.01 (chosen once, as 0.05 was, not tuned on the outcome)
    p.add_argument("--lr", type=positive(), default=None, help="default 0.05 for the table, 0.01 for the network")
    # 0.1: the beta of DPO and of the TR paper's DPO/KTO runs; for IPO it targets a margin 1/(2 beta) = 5 nats
    p.add_argument("--beta", type=positive(), default=0.1)
    p.add_argument("--width", type=at_least(0, zero="the tabular policy"), default=0, help="0: the tabular policy; W: "
                   "NeuralPolicy of width W")
    p.add_argument("--sweep", action="store_true", help="NeuralPolicy, widths 2/4/8 x seeds 0-3: outcome counts")
    p.add_argument("--out", type=text("a figure"), default="toy.png")
    args = p.parse_args()
    report_user_errors()
    if os.path.splitext(args.out)[1].lower() not in FIGURE_TYPES:
        p.error(f"--out {args.out}: the figure's type comes from its extension, one of {' '.join(FIGURE_TYPES)}")
    torch.set_num_threads(1)  # 84 numbers: thread start-up costs more than the math (20x slower on a busy 2-core box)
    t0 = time.time()
    # (label, alpha, tau): vanilla; soft updates every step (TR^alpha); hard copies every tau steps (TR^tau)
    variants = [("vanilla", None, None), ("soft", 0.1, 1), ("soft", 0.6, 1), ("hard", 1.0, 8), ("hard", 1.0, 32)]

    def run_all(seed, width):
        """Every method and variant from one SFT model and one set of pairs: {(method, alpha, tau): history}."""
        sft, chosen, rejected = make_data(seed, width)
        lr = args.lr or (0.01 if width else 0.05)
        runs = {}
        for base in ["dpo", "ipo", "kto"]:
            for kind, alpha, tau in variants:
                method = base if kind == "vanilla" else "tr_" + base
                runs[method, alpha, tau] = train(method, alpha, tau, sft, chosen, rejected, args.steps, lr,
                                                 args.beta)[2]
        return chosen, rejected, lr, runs

    if args.sweep:  # how often each variant ends with most mass out of distribution, or dips and recovers
        configs = [(width, seed) for width in (2, 4, 8) for seed in range(4)]
        outcomes = {}
        for width, seed in configs:
            _, _, lr, runs = run_all(seed, width)
            for key, history in runs.items():
                pc, end = [h["p_chosen"] for h in history], history[-1]
                outcomes.setdefault(key, []).append({
                    "ood": end["p_ood"] > 0.5,  # ends with most of its mass on sequences in no pair
                    "dip": min(pc) < pc[0] / 2 and end["p_chosen"] > pc[0],  # p(chosen) halves, then ends above start
                    "p_chosen": end["p_chosen"], "p_ood": end["p_ood"], "kl": end["kl"]})
        print(f"NeuralPolicy, widths 2/4/8 x seeds 0-3 = {len(configs)} settings, {args.steps} steps, Adam lr {lr}, "
              f"beta {args.beta}")
        print(f"{'method':8} {'alpha':>5} {'tau':>4} {'p(OOD)>0.5 at end':>18} {'dip+recovery':>13} "
              f"{'median p(c)':>11} {'median p(OOD)':>13} {'median KL':>9}")
        for (method, alpha, tau), rows in outcomes.items():
            median = lambda k: statistics.median(r[k] for r in rows)
            print(f"{method:8} {alpha or '-':>5} {tau or '-':>4} {sum(r['ood'] for r in rows):>15d}/{len(rows)} "
                  f"{sum(r['dip'] for r in rows):>10d}/{len(rows)} {median('p_chosen'):11.3f} "
                  f"{median('p_ood'):13.3f} {median('kl'):9.2f}")
        print(f"{time.time() - t0:.0f} s")
        raise SystemExit

    chosen, rejected, lr, runs = run_all(args.seed, args.width)
    start = runs["dpo", None, None][0]
    print(f"{'NeuralPolicy width ' + str(args.width) if args.width else 'tabular policy'}, seed {args.seed}, "
          f"{args.steps} steps, Adam lr {lr}, beta {args.beta}; chosen {chosen.tolist()}, "
          f"rejected {rejected.tolist()} (indices into all_sequences())")
    print(f"{'method':8} {'alpha':>5} {'tau':>4} {'p(chosen)':>9} {'min p(c)':>8} {'@step':>5} {'p(rej)':>8} "
          f"{'p(OOD)':>7} {'KL':>7}")
    print(f"{'sft':8} {'-':>5} {'-':>4} {start['p_chosen']:9.4f} {'-':>8} {'-':>5} {start['p_rejected']:8.4f} "
          f"{start['p_ood']:7.4f} {start['kl']:7.3f}")
    for (method, alpha, tau), history in runs.items():
        print(table_row(method, alpha, tau, history))

    import matplotlib  # only the script plots: the tests import this file without matplotlib's start-up cost
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("p_chosen", "p(chosen)"), ("p_rejected", "p(rejected)"), ("p_ood", "p(OOD)"), ("kl", "KL(pi || pi_SFT)")]
    fig, axes = plt.subplots(3, 4, figsize=(17, 10), sharex=True)
    for row, base in enumerate(["dpo", "ipo", "kto"]):
        for (method, alpha, tau), history in runs.items():
            if method.removeprefix("tr_") != base:
                continue
            name = base.upper()
            label = name if alpha is None else f"TR-{name} " + (f"α={alpha}" if tau == 1 else f"τ={tau}")
            for col, (key, title) in enumerate(keys):
                axes[row, col].plot([h[key] for h in history], label=label, lw=1.5,
                                    color="black" if alpha is None else None)  # vanilla in black
                axes[row, col].set_title(f"{base.upper()}: {title}", fontsize=11)
        axes[row, 0].legend(fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    policy = f"NeuralPolicy width {args.width}" if args.width else "tabular policy"
    fig.suptitle(f"Toy example: 64 sequences, {policy}, exact probabilities (seed {args.seed}, beta {args.beta}, "
                 f"Adam lr {lr})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} in {time.time() - t0:.1f} s")
