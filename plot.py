"""See the trust region: a run's curves from its metrics.jsonl, with every reference update marked.

    python plot.py out/tr_dpo-demo                            # -> out/tr_dpo-demo/curves.png
    python plot.py out/dpo out/tr_dpo_hard out/tr_dpo_soft --out curves.png      # several runs overlaid

Five panels against the optimizer step: the training loss, the implicit-reward margin and accuracy of the training
batches (against the reference each step trained with), the held-out reward accuracy (solid: against the moving
reference; dashed: against the SFT model), and the held-out drift from the SFT model, mean log pi - log pi_SFT
(solid: chosen; dashed: rejected), each at the steps it was measured (--eval_interval). Dotted vertical lines mark
the reference updates of runs that update every tau > 1 steps; a soft update every step would mark every step, so
the legend says it instead. After a hard copy the reference is the policy: the next batches start at margin 0 and
loss log 2, hence the saw-tooth.
"""
import argparse
import json
import os

from guards import UserError, report_user_errors
from ref_update import Rule

FIGURE_TYPES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")  # by matplotlib

PANELS = [("loss", "training loss", [("loss", "-")]),
          ("margins", "rewards/margins (train)", [("rewards/margins", "-")]),
          ("accuracy", "rewards/accuracies (train)", [("rewards/accuracies", "-")]),
          ("held-out", "held-out accuracy: vs reference (solid), vs SFT (dashed)",
           [("eval/rewards/accuracies", "-"), ("drift/accuracies", "--")]),
          ("drift", "drift from SFT, nats: chosen (solid), rejected (dashed)",
           [("drift/chosen", "-"), ("drift/rejected", "--")])]


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
                    ax.plot(list(evaluations), [r[key] for r in evaluations.values()], style, color=color, marker="o",
                            markersize=3)
                else:
                    ax.plot(steps, [r[key] for r in records], style, color=color)
            for s in reference_updates(args, steps[-1]):
                ax.axvline(s, color=color, linestyle=":", linewidth=0.8)
            ax.set_title(title, fontsize=9)
        axes[-1].plot([], [], color=color, label=label(folder, args))
    axes[-1].plot([], [], "k:", linewidth=0.8, label="reference update")
    axes[-1].legend(loc="center", fontsize=9, frameon=False)
    axes[-1].axis("off")
    for ax in axes[:-1]:
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    report_user_errors()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py output folders (each with args.json and metrics.jsonl)")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN/curves.png for the first run)")
    a = p.parse_args()
    if a.out and os.path.splitext(a.out)[1].lower() not in FIGURE_TYPES:
        p.error(f"--out {a.out}: the figure's type comes from its extension, one of {' '.join(FIGURE_TYPES)}")
    for folder in a.runs:
        read_run(folder)  # every folder checked before the figure starts
    print(f"wrote {plot(a.runs, a.out or os.path.join(a.runs[0], 'curves.png'))}")
