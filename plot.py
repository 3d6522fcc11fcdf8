"""See the trust region: a run's curves from its metrics.jsonl, with every reference update marked.

    python plot.py out/tr_dpo-demo                            # -> out/tr_dpo-demo/curves.png
    python plot.py out/dpo out/tr_dpo_hard out/tr_dpo_soft --out curves.png      # several runs overlaid

The panels are those metrics.py declares, each in a cell of its own, against the optimizer step, one colour per run;
held-out metrics at the steps they were measured (--eval_interval). Dotted vertical lines mark the reference updates
each run recorded (metrics.jsonl's ref_updates/applied: what happened, whatever the rule); an update after every step
would mark every step, so the legend says it instead. After a hard copy the reference is the policy: the next
batches start at margin 0 and loss log 2, hence the saw-tooth.

The reference's own drift from the SFT model (drift/reference_*, the centre of the trust region) is constant between
updates, so unless the reference moved after every step it is drawn as a step function that jumps at each update,
its value read from an evaluation made while that reference was in force (none: a gap). A line through the
evaluations would draw a copy at step 16 as a slope from step 0 to 20. Under a soft update every step it glides: a
line.

Ties. Where policy and reference are the same model every margin is exactly 0, and train.py's accuracies (TRL's
strict chosen > rejected) log 0, which reads as "always wrong". The curves draw such a tie as an open circle at 0.5,
off the line (the line has a gap there; a measured 0.5 is on it, or a dot where gaps surround it), wherever the
rewards (or drifts) behind an accuracy are all exactly 0: before the first step, at step 1 under a warm-up (lr 0), at
the step after a hard copy. metrics.jsonl keeps TRL's 0.

    quality_vs_kl(results, out): evaluate.py's results.json files, the win rate with its standard error against the
    KL to the SFT model, one panel per file (LESSON.md, Part 5)
"""
import argparse
import json
import math
import os

from flags import text
from guards import UserError, report_user_errors
from metrics import METRICS
from ref_update import recorded

FIGURE_TYPES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")  # by matplotlib

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


def reference_updates(records):
    """[(step, weight)]: the reference updates the run applied, as it recorded them (metrics.jsonl's
    ref_updates/applied, in every record of a TR run), never re-derived from its rule's flags; those that moved it
    (weight > 0). None where nothing was recorded: a vanilla run, or one logged before the record existed."""
    if not any("ref_updates/applied" in r for r in records):
        return None
    return [(s, w) for r in records for s, w in r.get("ref_updates/applied", []) if w > 0]


def every_step(updates, last_step):
    """Whether the reference moved after every step: a mark at each would fill the panel, so the legend says it."""
    return len(updates or []) == last_step > 0


def label(name, method, updates, last_step):
    """A run's name in a legend (plot.py's, evaluate.py's): its name, its method, and the reference updates it
    recorded up to `last_step` (reference_updates; None: nothing recorded)."""
    return f"{name} ({method}{'' if updates is None else ', ' + recorded(updates, last_step)})"


def panels():
    """{title: [(key, line), ...]}: the panels metrics.METRICS declares, in its order, each with its metrics."""
    drawn = {}
    for key, (_, panel, line) in METRICS.items():
        if panel:
            drawn.setdefault(panel, []).append((key, line))
    return drawn


def measured(key, records):
    """[(step, value)]: one metric of one run where it was measured; held-out metrics once per evaluation, at its own
    step (a log line repeats the latest). A tie's value is NaN. A run logged before the metric existed: []."""
    if key.startswith(("eval/", "drift/")):
        points = sorted({r.get("eval/step", r["step"]): r for r in records if key in r}.items())
    else:
        points = [(r["step"], r) for r in records if key in r]
    return [(s, math.nan if is_tie(key, r) else r[key]) for s, r in points]


def series(key, records):
    """(x, y): the line of one metric of one run, with a gap at each tie. The reference's drift, unless the run
    recorded an update after every step, is a step function: constant from one update to the next, a vertical jump at
    each, its value from an evaluation while it was in force (none: a gap). Where no update was recorded (a vanilla
    run, or one logged before the record existed), the measured points, joined: no jump is drawn that is not known."""
    points = measured(key, records)
    last = max(records[-1]["step"], points[-1][0]) if points else 0
    moved = reference_updates(records)
    if not key.startswith("drift/reference") or not points or moved is None or every_step(moved, records[-1]["step"]):
        return [s for s, _ in points], [v for _, v in points]
    # the evaluation after step s measured the reference step s trained with: the one after the updates before s
    updates = [s for s, _ in moved or [] if s < last]
    bounds = [0, *updates, last]  # reference k is in force from bounds[k] to bounds[k + 1]
    value = {sum(u < s for u in updates): v for s, v in points}
    x, y = [], []
    for k in range(len(bounds) - 1):
        x += [bounds[k], bounds[k + 1]] if k in value else [bounds[k]]
        y += [value[k]] * 2 if k in value else [math.nan]
    return x, y


def lone(points):
    """The points a line cannot show: a gap (a tie, or the end) on both sides."""
    values = [math.nan, *(v for _, v in points), math.nan]
    return [(s, v) for i, (s, v) in enumerate(points)
            if not math.isnan(v) and math.isnan(values[i]) and math.isnan(values[i + 2])]


def style(key):
    """How a metric's points look: the reference's drift thin, with an x at each evaluation; the policy's held-out
    metrics a dot at each evaluation; training metrics a plain line."""
    if key.startswith("drift/reference"):
        return {"linewidth": 0.8, "marker": "x", "markersize": 4}
    return {"linewidth": 1.5, "marker": "o" if key.startswith(("eval/", "drift/")) else None, "markersize": 3}


def plot(folders, out):
    """Draw the runs' curves into `out`; returns it."""
    fig = figure(folders)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def figure(folders):
    """One panel per metrics.py panel, then the legend in a cell of its own: a grid of 3 columns, as many rows as
    they need."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn = panels()
    columns, rows = 3, math.ceil((len(drawn) + 1) / 3)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.75 * rows), squeeze=False)
    axes, legend = axes.ravel()[:len(drawn)], axes.ravel()[len(drawn)]
    for ax in fig.axes[len(drawn):]:
        ax.axis("off")
    for ax, (title, lines) in zip(axes, drawn.items()):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:  # which line is which metric
            for key, line in lines:
                ax.plot([], [], line, color="k", label=key, **style(key))
            ax.legend(fontsize=7)
    for i, folder in enumerate(folders):
        args, records = read_run(folder)
        color, updates = f"C{i}", reference_updates(records)
        for ax, lines in zip(axes, drawn.values()):
            for key, line in lines:
                look = style(key)
                ax.plot(*series(key, records), line, color=color, linewidth=look["linewidth"])
                points = measured(key, records)
                marked = points if look["marker"] else lone(points)  # each evaluation; or a point no line reaches
                ax.plot([s for s, _ in marked], [v for _, v in marked], look["marker"] or "o", color=color,
                        markersize=look["markersize"])
                ties = [s for s, v in points if math.isnan(v)]
                ax.plot(ties, [0.5] * len(ties), "o", markersize=7, markerfacecolor="white", markeredgecolor=color)
            for s, _ in [] if every_step(updates, records[-1]["step"]) else updates or []:
                ax.axvline(s, color=color, linestyle=":", linewidth=0.8)
        legend.plot([], [], color=color, label=label(os.path.basename(os.path.normpath(folder)), args["method"],
                                                  updates, records[-1]["step"]))
    legend.plot([], [], "k:", linewidth=0.8, label="reference update")
    legend.plot([], [], "o", color="k", markerfacecolor="white", markersize=7,
                label="a tie: every margin exactly 0 (policy = reference),\n"
                      "an open circle at 0.5, off the line (metrics.jsonl: 0, strict >)")
    legend.legend(loc="center", fontsize=9, frameon=False)
    fig.tight_layout()
    return fig


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
            name = label(run, points[-1]["method"], points[-1].get("ref_updates"), points[-1]["step"])
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
