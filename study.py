"""The paper's over-optimization experiment in one command: for each configuration (a method with its alpha/tau) and
each seed, train (train.py), evaluate the run's checkpoints on held-out prompts (evaluate.py), then aggregate over the
seeds: per configuration and step, the mean gold score, win rate against the SFT model and KL(pi || pi_SFT), each
with its standard error across seeds, as a table and as quality against KL with error bars both ways; and each
configuration minus the first, paired within a seed: at the same step, and at the same KL where the first one's curve
reaches it (the paper's claim is about quality at a given KL).

    python study.py                      # the CPU study: DPO, TR-DPO hard and soft on the demo, seeds 0-3
    python study.py --seeds 0 1          # a part of it; the aggregate covers every finished run of the study
    python study.py --launcher "torchrun --nproc_per_node 8" --train="..." --evaluate="..."   # README: the paper's

A run (a configuration and a seed) trains into WORK/NAME-seedS, is evaluated into WORK/NAME-seedS-eval (replacing
an evaluation cut short), and its records go to OUT's folder (results/study/NAME-seedS.json) only when both are done;
then its checkpoints are deleted. A run whose file exists is skipped, and one that was stopped mid-training continues
(--resume auto): a study can stop and go on across days and machines when those small files are committed. Seed s
trains with --seed s (the order of the training pairs: the pretrained model starts the same in every run) and
evaluates with --seed 2s (the policy's samples; the SFT model's take 2s + 1), so each seed replicates everything
random. Within a seed every configuration is scored on the same prompts with the same sampling seeds and the same SFT
samples: configurations compare paired.
"""
import argparse
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

from checkpoint import check_deletion, completed, finished
from flags import random_seed, text
from guards import STOPPED, UserError, report_user_errors
from identity import configuration, configuration_name as name

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ["--method dpo", "--method tr_dpo --tau 16", "--method tr_dpo --alpha 0.1"]  # RESULTS.md's three
TRAIN = "--max_steps 64 --save_interval 32 --lr 3e-5 --beta 0.1 --eval_pairs 0 --log_interval 8"
EVALUATE = "--baseline smollm2-135m-instruct --n_prompts 250 --max_new_tokens 48 --n_pairs 0"
QUANTITIES = [("gold", "gold"), ("win_rate", "win rate"), ("kl", "KL seq"), ("mean_length", "length")]


def recorded(result, config):
    """Whether `result` (results/study/NAME-seedS.json) holds this configuration's results: it exists, and the
    configuration it records parses as this one (identity.configuration); one that a name stands for alike is
    refused, never taken for this one."""
    if not os.path.exists(result):
        return False
    recorded = json.load(open(result))["config"]
    if configuration(recorded) != configuration(config):
        raise UserError(f"{result} holds the results of configuration {recorded!r}, not of {config!r}, which has the "
                        "same name: move that file away, or give this configuration's flags otherwise")
    return True


def call(command):
    """Run train.py or evaluate.py as a user would; a failure stops the study, its run left to continue."""
    print("$ " + shlex.join(command), flush=True)
    status = subprocess.run(command).returncode
    if status != 0:
        raise UserError(f"this command {'was stopped' if status == STOPPED else 'failed'} (exit {status}); fix what it "
                        "says and run the study again: finished runs are kept, this one continues")


def run_inputs(config, args):
    """What a run reads, by flag (train.py's --model, --dataset, --data_dir): never deleted with its checkpoints."""
    words = [*shlex.split(args.train), *shlex.split(config)]
    return [(w, words[i + 1]) for i, w in enumerate(words[:-1]) if w in ("--model", "--dataset", "--data_dir")]


def run(config, seed, args, result):
    """Train, evaluate, write the run's records to `result`, delete its checkpoints."""
    out_dir = os.path.join(args.work, f"{name(config)}-seed{seed}")
    started = time.time()
    call([*shlex.split(args.launcher), os.path.join(HERE, "train.py"), *shlex.split(args.train), *shlex.split(config),
          "--seed", str(seed), "--out_dir", out_dir, "--resume", "auto"])  # stopped mid-run: continue it
    if not finished(out_dir):  # read from its checkpoints, not from the exit status a launcher passed on
        raise UserError(f"the training in {out_dir} stopped before its last step (a signal?): nothing is recorded; run "
                        "the study again to continue it")
    trained = time.time()
    checkpoints = completed(out_dir)
    eval_dir = out_dir + "-eval"
    call([sys.executable, os.path.join(HERE, "evaluate.py"), *checkpoints, *shlex.split(args.evaluate), "--overwrite",
          "--seed", str(2 * seed), "--out_dir", eval_dir])  # 2s and 2s + 1: no two seeds share a sampling stream
    scored = json.load(open(os.path.join(eval_dir, "results.json")))
    baseline = next((r for r in scored if r["checkpoint"] not in checkpoints), {})  # the SFT model's own samples
    records = [{"config": config, "method": r["method"], "alpha": r["alpha"], "tau": r["tau"], "beta": r["beta"],
                "seed": seed, "step": r["step"], "gold": r.get("gold_score"), "win_rate": r["win_rate"],
                "win_rate_se": r["win_rate_se"], "kl": r["kl_seq"], "kl_token": r["kl_token"],
                "mean_length": r["mean_length"], "baseline_gold": baseline.get("gold_score")}
               for r in scored if r["checkpoint"] in checkpoints]
    per_prompt = {str(r["step"]): r.get("gold_scores") for r in [baseline, *scored] if r.get("gold_scores")}
    done = {"config": config, "seed": seed, "train": args.train, "evaluate": args.evaluate, "records": records,
            "gold_per_prompt": per_prompt, "wall_s": {"train": trained - started, "evaluate": time.time() - trained}}
    json.dump(done, open(result + ".tmp", "w"), indent=1)
    os.replace(result + ".tmp", result)  # written whole or not at all: its presence means the run is done


def mean_se(values):
    """(mean, standard error of the mean across seeds); the error is nan for one seed."""
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else math.nan
    return m, math.sqrt(var / len(values))


def sft(record):
    """The SFT model's point in a record's seed: its own samples' gold score, a win rate of 1/2 against itself, KL 0."""
    return {"gold": record["baseline_gold"], "win_rate": 0.5, "kl": 0.0}


def aggregate(records):
    """{(config, step): (seeds, {quantity: (mean, s.e.)})} over the seeds; ("SFT", 0): the SFT model's own samples."""
    sft_points = {r["seed"]: sft(r) for r in records}  # one per seed
    groups = {("SFT", 0): list(sft_points.values())}
    for r in records:
        groups.setdefault((r["config"], r["step"]), []).append(r)
    return {key: (len(rows), {q: mean_se([r[q] for r in rows]) for q, _ in QUANTITIES
                              if all(r.get(q) is not None for r in rows)}) for key, rows in groups.items()}


def at_kl(curve, kl):
    """A curve's quality at `kl`, linear between consecutive points [(kl, quality), ...] in step order (the SFT model
    at KL 0, then the checkpoints by step); None where it never reaches `kl` (no guess). A curve that turns back crosses
    a KL more than once: the mean over its crossings, each point of the curve at that KL once."""
    crossings = {}
    for i, ((k0, q0), (k1, q1)) in enumerate(zip(curve, curve[1:])):
        for point, (k, q) in ((i, (k0, q0)), (i + 1, (k1, q1))):
            if k == kl:
                crossings[point] = q
        if min(k0, k1) < kl < max(k0, k1):
            crossings[(i, i + 1)] = q0 + (q1 - q0) * (kl - k0) / (k1 - k0)
    return sum(crossings.values()) / len(crossings) if crossings else None


def t_test(values):
    """(t, two-sided p) of the mean of `values` against 0 on len - 1 degrees of freedom (Student's t: with 4 seeds a
    mean four standard errors from 0 has p 0.025, not a normal's 0.00006). The closed form for integer degrees of
    freedom (Abramowitz & Stegun 26.7.3-4): A = P(|T| < t) from theta = atan(t / sqrt(df))."""
    df = len(values) - 1
    m, se = mean_se(values)
    t = m / se if se > 0 else math.copysign(math.inf, m)
    theta = math.atan(abs(t) / math.sqrt(df))
    cos, term, total = math.cos(theta), 1.0, 1.0  # the series' first term, then each from the one before
    for k in range(2, df - 1, 2):  # up to cos^(df - 2) theta
        term *= cos ** 2 * k / (k + 1) if df % 2 else cos ** 2 * (k - 1) / k
        total += term
    inside = (2 / math.pi * (theta + math.sin(theta) * cos * total * (df > 1)) if df % 2 else math.sin(theta) * total)
    return t, max(0.0, 1 - inside)


def difference(values):
    """A paired difference over seeds as printed: mean ± s.e., and Student's two-sided p (t_test) from 2 seeds on."""
    m, se = mean_se(values)
    return f"{m:+.3f} ± {se:.3f}" + (f" (p {t_test(values)[1]:.3f})" if len(values) > 1 else "")


def report(records, configs, out):
    """Print the table and the paired differences from the first configuration; draw quality against KL."""
    if not records:
        return print("no run of this study has finished yet")
    table = aggregate(records)
    print(f"\n{'configuration':<28} {'step':>4} {'seeds':>5} " + " ".join(f"{t:>15}" for _, t in QUANTITIES))
    for (config, step), (n, stats) in table.items():
        cells = [f"{stats[q][0]:7.3f} ± {stats[q][1]:5.3f}" if q in stats else f"{'-':>15}" for q, _ in QUANTITIES]
        print(f"{config:<28} {step:>4} {n:>5} " + " ".join(cells))
    first = configs[0]
    quality = "gold" if all(r["gold"] is not None for r in records) else "win_rate"
    by = {(r["config"], r["step"], r["seed"]): r for r in records}
    curves = {}  # seed -> the first configuration's curve in step order: the SFT model at KL 0, then its checkpoints
    for r in sorted(records, key=lambda r: r["step"]):
        if r["config"] == first:
            curves.setdefault(r["seed"], [(0.0, sft(r)[quality])])
            curves[r["seed"]].append((r["kl"], r[quality]))
    print(f"\nminus {first}, same step and seed (paired: same prompts and sampling seeds), mean ± s.e. over seeds; "
          f"(p: Student's t, two-sided, seeds - 1 degrees of freedom); last, {quality} minus {first}'s at the same KL "
          "(its curve in that seed in step order, linear between its points, the mean where it crosses that KL more "
          "than once; the seeds whose KL it reaches)")
    for config in configs[1:]:
        for step in sorted({r["step"] for r in records if r["config"] == config}):
            pairs = [(by[(config, step, s)], by[(first, step, s)]) for s in sorted({r["seed"] for r in records})
                     if (config, step, s) in by and (first, step, s) in by]
            if pairs:
                cells = [f"{q} {difference([a[q] - b[q] for a, b in pairs])}" for q, _ in QUANTITIES[:3]
                         if pairs[0][0][q] is not None]
                on_curve = [(r[quality], at_kl(curves[r["seed"]], r["kl"])) for r, _ in pairs]
                matched = [q - q_first for q, q_first in on_curve if q_first is not None]
                cells.append(f"at the same KL {difference(matched)} in {len(matched)} of {len(pairs)}" if matched
                             else f"at the same KL: none of {len(pairs)}")
                print(f"{config:<28} {step:>4} {len(pairs):>5}  " + "   ".join(cells))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sft_stats = table[("SFT", 0)][1]
    for i, config in enumerate(c for c in configs if any(r["config"] == c for r in records)):
        steps = [(step, stats) for (c, step), (n, stats) in sorted(table.items()) if c == config]
        points = [sft_stats] + [stats for step, stats in steps]
        ax.errorbar([p["kl"][0] for p in points], [p[quality][0] for p in points], xerr=[p["kl"][1] for p in points],
                    yerr=[p[quality][1] for p in points], fmt="o-", color=f"C{i}", capsize=3, markersize=4,
                    label=f"{name(config)}, seeds: {len({r['seed'] for r in records if r['config'] == config})}")
        for step, stats in steps:
            ax.annotate(str(step), (stats["kl"][0], stats[quality][0]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    ax.set_xlabel("KL(pi || pi_SFT), nats per sequence (policy samples)")
    ax.set_ylabel({"gold": "gold score of samples", "win_rate": "win rate vs the SFT model"}[quality])
    ax.set_title("mean over seeds, ± 1 s.e. both ways; the step beside each point, the SFT model at KL 0",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.splitext(out)[0] + ".png", dpi=120)


def check_same_study(folder, args):
    """Every run of a study trains and evaluates alike: a run file made with other flags (parsed: their spelling and
    order do not matter) is refused."""
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        r = json.load(open(path))
        if [configuration(r["train"]), configuration(r["evaluate"])] != [configuration(args.train),
                                                                          configuration(args.evaluate)]:
            raise UserError(f"{path} was made with --train={r['train']!r} --evaluate={r['evaluate']!r}, not with "
                            "this command's: give the same flags, or another --out for another study")


def main():
    report_user_errors()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", type=text("train.py flags"), default=CONFIGS,
                   help="train.py flags of each configuration")
    p.add_argument("--seeds", nargs="+", type=random_seed(), default=[0, 1, 2, 3], help="the seeds to run now (a "
                   "part)")
    p.add_argument("--train", type=text("train.py flags"), default=TRAIN, help="train.py flags of every run (give it "
                   "as --train=\"...\")")
    p.add_argument("--evaluate", type=text("evaluate.py flags"), default=EVALUATE, help="evaluate.py flags of every "
                   "run (--evaluate=\"...\")")
    p.add_argument("--launcher", type=text("a command"), default=shlex.quote(sys.executable), help="what starts "
                   "train.py, e.g. \"torchrun --nproc_per_node 8\" (default: this python)")
    p.add_argument("--work", type=text("a folder"), default="out/study", help="checkpoints and evaluations, "
                   "deleted once a run is done")
    p.add_argument("--out", type=text("a .json path"), default="results/study.json", help="the records; beside it "
                   "the figure (.png) and a folder of one small file per finished run")
    args = p.parse_args()
    folder = os.path.splitext(args.out)[0]
    os.makedirs(folder, exist_ok=True)
    check_same_study(folder, args)
    for seed in args.seeds:
        for config in args.configs:
            result = os.path.join(folder, f"{name(config)}-seed{seed}.json")
            if recorded(result, config):
                print(f"skipped {name(config)} seed {seed}: {result} holds its results")
            else:
                run(config, seed, args, result)
            checkpoints = completed(os.path.join(args.work, f"{name(config)}-seed{seed}"))
            check_deletion(checkpoints, run_inputs(config, args), os.path.exists(result), f"{result} is missing")
            for checkpoint in checkpoints:
                shutil.rmtree(checkpoint)  # only results are kept: a checkpoint of 135M parameters is 1.6 GB
    runs = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(folder, "*.json")))]
    spelled = {name(c): c for c in args.configs}  # a configuration is its parsed flags: spelt as this command does
    records = [{**record, "config": spelled.get(name(record["config"]), record["config"])}
               for r in runs for record in r["records"]]
    json.dump(records, open(args.out, "w"), indent=1)
    configs = list(dict.fromkeys([*args.configs, *(record["config"] for record in records)]))
    report(records, configs, args.out)
    hours = [sum(r["wall_s"][part] for r in runs) / 3600 for part in ("train", "evaluate")]
    print(f"\nwrote {args.out} ({len(records)} records of {len(runs)} runs, which took {hours[0]:.2f} h of training "
          f"and {hours[1]:.2f} h of evaluation) and {folder}.png")


if __name__ == "__main__":
    main()
