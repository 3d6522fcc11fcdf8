"""See the trust region: a run's curves from its metrics.jsonl, with every reference update marked.

    python plot.py out/tr_dpo-demo                            # -> out/tr_dpo-demo/curves.png
    python plot.py out/dpo out/tr_dpo_hard out/tr_dpo_soft --out curves.png      # several runs overlaid

Five panels against the optimizer step: the training loss, the implicit-reward margin and accuracy of the training
batches (against the reference each step trained with), the held-out reward accuracy (solid: against the moving
reference; dashed: against the SFT model), and the held-out drift from the SFT model, mean log pi - log pi_SFT
(solid: chosen; dashed: rejected), each at the steps it was measured (--eval_interval), with the reference's own drift
beside it (thin, x): the centre of the trust region, which jumps at each hard copy and glides under a soft update.
Dotted vertical lines mark the reference updates of runs that update every tau > 1 steps; a soft update every step
would mark every step, so the legend says it instead. After a hard copy the reference is the policy: the next batches
start at margin 0 and loss log 2, hence the saw-tooth.

Ties. Where policy and reference are the same model every margin is exactly 0, and train.py's accuracies (TRL's
strict chosen > rejected) log 0, which reads as "always wrong". The curves draw such a tie at 0.5, as an open
circle, wherever the rewards (or drifts) behind an accuracy are all exactly 0: before the first step, at step 1 under
a warm-up (lr 0), at the step after a hard copy. metrics.jsonl keeps TRL's 0.

    quality_vs_kl(results, out): evaluate.py's results.json files, the win rate with its standard error against the
    KL to the SFT model, one panel per file (LESSON.md, Part 5)
"""
import argparse
import json
import os

from flags import text
from guards import UserError, report_user_errors
from ref_update import Rule

FIGURE_TYPES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")  # by matplotlib

PANELS = [("loss", "training loss", [("loss", "-")]),
          ("margins", "rewards/margins (train)", [("rewards/margins", "-")]),
          ("accuracy", "rewards/accuracies (train)", [("rewards/accuracies", "-")]),
          ("held-out", "held-out accuracy: vs reference (solid), vs SFT (dashed)",
           [("eval/rewards/accuracies", "-"), ("drift/accuracies", "--")]),
          ("drift", "held-out drift from SFT, nats: chosen (solid), rejected (dashed);\n"
                    "policy (thick), reference (thin, x: the trust region's centre)",
           [("drift/chosen", "-"), ("drift/rejected", "--"), ("drift/reference_chosen", "-"),
            ("drift/reference_rejected", "--")])]
# each accuracy (strict chosen > rejected: a tie logs 0), and what is exactly 0 when all its margins are 0
TIES = {"rewards/accuracies": ("rewards/chosen", "rewards/rejected"),
        "eval/rewards/accuracies": ("eval/rewards/margins",), "drift/accuracies": ("drift/chosen", "drift/rejected")}


def is_tie(key, record):
    """Whether this accuracy counts ties: its rewards (or drifts) are exactly 0, which means in practice that every
    pair's are (the model that gives them is the one measured against: step 0, warm-up's lr 0, after a hard copy)."""
    return key in TIES and all(record.get(k) == 0 for k in TIES[key])


def read_run(folder):
    """(args, records): the run's arguments and its log records, one per step (a resumed run's repeats: the last).
    A line cut short (a run killed while writing it) is skipped; any other damage is an error naming file and line."""
    for name in ("args.json", "metrics.jsonl"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{folder} has no {name}: is it a train.py --out_dir? (a run folder holds args.json and "
                            "metrics.jsonl; its checkpoints are the step_N folders inside it)")
    try:
        args = json.load(open(os.path.join(folder, "args.json")))
    except json.JSONDecodeError as e:
        raise UserError(f"{folder}/args.json is not valid JSON ({e.msg}, line {e.lineno})")
    path, by_step = os.path.join(folder, "metrics.jsonl"), {}
    lines = open(path).read().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the last line, cut short
                continue
            raise UserError(f"{path}:{number} is not valid JSON ({e.msg}); fix or delete that line")
        by_step[record["step"]] = record
    if not by_step:
        raise UserError(f"{path} holds no log line yet: the run has not reached its first --log_interval")
    return args, [by_step[s] for s in sorted(by_step)]


def reference_updates(args, last_step):
    """The steps after which the reference moved, by the run's rule (ref_update.Rule); [] for vanilla methods and
    for a soft update every step (tau 1), where every step would be one."""
    rule = Rule.of_run(args)
    if rule is None or rule.alpha == 0 or rule.tau == 1:
        return []
    return [s for s in range(1, last_step + 1) if rule.due(s)]


def label(folder, args):
    rule = Rule.of_run(args)
    return f"{os.path.basename(os.path.normpath(folder))} ({args['method']}{f', {rule.label}' if rule else ''})"


def plot(folders, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    axes = axes.ravel()
    for i, folder in enumerate(folders):
        args, records = read_run(folder)
        color = f"C{i}"
        steps = [r["step"] for r in records]
        evaluations = {r.get("eval/step", r["step"]): r for r in records}  # each evaluation once, at its own step
        for ax, (_, title, series) in zip(axes, PANELS):
            for key, style in series:
                if key not in records[0]:  # SFT has no rewards; --eval_pairs 0 has no held-out metrics
                    continue
                if key.startswith(("eval/", "drift/")):  # a log line repeats the latest evaluation: plot each once
                    points = list(evaluations.items())
                else:
                    points = [(r["step"], r) for r in records]
                x = [s for s, _ in points]
                ties = [is_tie(key, r) for _, r in points]
                y = [0.5 if tie else r[key] for (_, r), tie in zip(points, ties)]
                reference = key.startswith("drift/reference")
                ax.plot(x, y, style, color=color, linewidth=0.8 if reference else 1.5,
                        marker="x" if reference else "o" if key.startswith(("eval/", "drift/")) else None,
                        markersize=4 if reference else 3)
                if any(ties):
                    ax.plot([a for a, t in zip(x, ties) if t], [0.5] * sum(ties), "o", markersize=7,
                            markerfacecolor="white", markeredgecolor=color)
            for s in reference_updates(args, steps[-1]):
                ax.axvline(s, color=color, linestyle=":", linewidth=0.8)
            ax.set_title(title, fontsize=9)
        axes[-1].plot([], [], color=color, label=label(folder, args))
    axes[-1].plot([], [], "k:", linewidth=0.8, label="reference update")
    axes[-1].plot([], [], "o", color="k", markerfacecolor="white", markersize=7,
                  label="a tie: every margin exactly 0 (policy = reference),\n"
                        "drawn at 0.5 (metrics.jsonl: 0, strict >)")
    axes[-1].legend(loc="center", fontsize=9, frameon=False)
    axes[-1].axis("off")
    for ax in axes[:-1]:
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    return out



def quality_vs_kl(results, out):
    """evaluate.py's results.json files, one panel each: every run's win rate against the baseline, +- one standard
    error (win_rate_se, over the prompts), against KL(pi || pi_SFT), checkpoints in step order. The KL estimates have
    their own noise, which results.json does not keep: no horizontal bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), sharey=True, squeeze=False)
    for ax, path in zip(axes[0], results):
        runs = {}
        for r in json.load(open(path)):
            runs.setdefault(r["run"], []).append(r)
        base = runs.pop("baseline", [])
        for i, (run, points) in enumerate(sorted(runs.items())):
            points.sort(key=lambda r: r["step"])
            name = label(run, points[0])  # a row holds its run's method, alpha and tau, as args.json does
            points = base + points  # every run starts at the baseline: KL 0, win rate 1/2
            ax.errorbar([r["kl_seq"] for r in points], [r["win_rate"] for r in points],
                        yerr=[r.get("win_rate_se") or 0 for r in points], fmt="o-", color=f"C{i}", capsize=3,
                        markersize=4, label=name)
            for r in points[len(base):]:
                ax.annotate(str(r["step"]), (r["kl_seq"], r["win_rate"]), fontsize=6, xytext=(3, -9),
                            textcoords="offset points")
        ax.axhline(0.5, color="k", linewidth=0.6)
        ax.set_title(f"{path}: win rate vs baseline, +- 1 s.e. (step beside each point)", fontsize=8)
        ax.set_xlabel("KL(pi || pi_SFT), nats per sequence (policy samples)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("win rate vs baseline (gold judge; a tie counts 1/2)", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    return out

if __name__ == "__main__":
    report_user_errors()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=text("run folders"), help="train.py output folders (each with args.json "
                   "and metrics.jsonl)")
    p.add_argument("--out", type=text("a figure"), default=None, help="the PNG to write (default: RUN/curves.png for "
                   "the first run)")
    a = p.parse_args()
    if a.out and os.path.splitext(a.out)[1].lower() not in FIGURE_TYPES:
        p.error(f"--out {a.out}: the figure's type comes from its extension, one of {' '.join(FIGURE_TYPES)}")
    for folder in a.runs:
        read_run(folder)  # every folder checked before the figure starts
    print(f"wrote {plot(a.runs, a.out or os.path.join(a.runs[0], 'curves.png'))}")
