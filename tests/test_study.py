"""study.py end to end on a tiny model: two configurations x two seeds, trained and evaluated by train.py and
evaluate.py as a user runs them, aggregated over the seeds; a second call skips what is done, a stopped run continues,
and a study's files made with other flags are refused."""
import contextlib
import io
import json
import math
import os
import runpy
import signal
import statistics
import sys

import pytest

import study
from conftest import ROOT, TINY
from guards import UserError

pytestmark = pytest.mark.slow  # runs train.py and evaluate.py: `make test` runs it, `make test-fast` not

CONFIGS = ["--method dpo", "--method tr_dpo --tau 1"]
STEPS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny pretrained model: a folder of weights (built once from tests/tiny_llama.json) and the tokenizer, so that
    every seed starts from the same weights, as the study's runs start from SmolLM2."""
    from model import load_model, load_tokenizer
    folder = tmp_path_factory.mktemp("tiny-sft")
    load_model(TINY).save_pretrained(folder)
    load_tokenizer(TINY, log=lambda m: None).save_pretrained(folder)
    return str(folder)


def flags(model):
    train = (f"--model {model} --max_steps {STEPS} --save_interval 1 --batch_size 4 --micro_batch_size 4 --lr 1e-3 "
             "--warmup_steps 0 --eval_pairs 0 --max_length 96 --max_prompt_length 64")
    return train, f"--baseline {model} --n_prompts 6 --max_new_tokens 4 --n_pairs 0 --batch_size 8"


def run_study(tmp, model, *extra, fail=None):
    """study.py in this process, its train.py / evaluate.py commands too (runpy, as conftest.train_py runs train.py):
    (the commands it ran, its output). fail: a script whose next run exits 1 instead of running."""
    train, evaluate = flags(model)
    commands, output = [], io.StringIO()

    def call(command):
        commands.append(command)
        assert command[0] == sys.executable  # the default launcher: this python
        if fail and command[1].endswith(fail):
            raise UserError("this command failed (exit 1)")
        saved = sys.argv, sys.excepthook, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        sys.argv = command[1:]
        try:
            runpy.run_path(command[1], run_name="__main__")
        except SystemExit as e:
            assert not e.code, output.getvalue()[-3000:]
        finally:
            sys.argv, sys.excepthook = saved[:2]
            signal.signal(signal.SIGINT, saved[2])
            signal.signal(signal.SIGTERM, saved[3])

    argv = ["study.py", "--configs", *CONFIGS, "--seeds", "0", "1", f"--train={train}", f"--evaluate={evaluate}",
            "--work", str(tmp / "work"), "--out", str(tmp / "results" / "study.json"), *extra]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        patch.setattr(sys, "argv", argv)
        patch.setattr(study, "call", call)
        patch.chdir(ROOT)
        study.main()
    return commands, output.getvalue()


@pytest.fixture(scope="module")
def done(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("study")
    commands, output = run_study(tmp, model)
    return tmp, commands, output


def test_every_configuration_seed_and_step_is_a_record_and_nothing_else_is_kept(done):
    tmp, commands, output = done
    records = json.load(open(tmp / "results" / "study.json"))
    assert len(records) == len(CONFIGS) * 2 * STEPS
    for r in records:
        assert {"method", "alpha", "tau", "seed", "step", "gold", "win_rate", "kl"} <= set(r)
        assert (r["method"], r["alpha"], r["tau"]) == (("dpo", None, None) if r["config"] == CONFIGS[0] else
                                                       ("tr_dpo", 1.0, 1))
        assert 0 <= r["gold"] <= 1 and 0 <= r["win_rate"] <= 1 and math.isfinite(r["kl"])
    assert sorted((r["config"], r["seed"], r["step"]) for r in records) == \
        sorted((c, s, t) for c in CONFIGS for s in (0, 1) for t in range(1, STEPS + 1))
    for r in records:  # each run's file keeps the gold score of every prompt: the record's mean is their mean
        run = json.load(open(tmp / "results" / "study" / f"{study.name(r['config'])}-seed{r['seed']}.json"))
        assert r["gold"] == pytest.approx(statistics.mean(run["gold_per_prompt"][str(r["step"])]))
        assert r["baseline_gold"] == pytest.approx(statistics.mean(run["gold_per_prompt"]["0"]))  # the SFT model's
    assert os.path.getsize(tmp / "results" / "study.png") > 0
    assert not list((tmp / "work").glob("*/step_*"))  # checkpoints deleted once evaluated
    assert len(commands) == len(CONFIGS) * 2 * 2  # a train.py and an evaluate.py command per run


def test_a_seed_replicates_the_training_order_and_the_sampling_and_configurations_share_a_seeds_samples(done):
    tmp, commands, output = done
    for command in commands:
        seed = int(command[command.index("--seed") + 1])
        run = os.path.basename(command[command.index("--out_dir") + 1])
        assert run.endswith(f"seed{seed}" if command[1].endswith("train.py") else f"seed{seed // 2}-eval")
    records = json.load(open(tmp / "results" / "study.json"))
    for seed in (0, 1):  # one SFT sample set per seed, shared by every configuration
        assert len({r["baseline_gold"] for r in records if r["seed"] == seed}) == 1


def test_the_table_is_the_mean_and_standard_error_over_seeds(done):
    tmp, commands, output = done
    records = json.load(open(tmp / "results" / "study.json"))
    table = study.aggregate(records)
    for config in CONFIGS:
        for step in range(1, STEPS + 1):
            n, stats = table[(config, step)]
            for q in ("gold", "win_rate", "kl"):
                values = [r[q] for r in records if (r["config"], r["step"]) == (config, step)]
                assert n == len(values) == 2
                assert stats[q][0] == pytest.approx(statistics.mean(values))
                assert stats[q][1] == pytest.approx(statistics.stdev(values) / math.sqrt(2))
            assert f"{stats['kl'][0]:7.3f} ± {stats['kl'][1]:5.3f}" in output


def test_a_second_call_skips_finished_runs(done, model):
    tmp, commands, output = done
    before = open(tmp / "results" / "study.json").read()
    again, output = run_study(tmp, model)
    assert again == [] and output.count("skipped") == len(CONFIGS) * 2
    assert open(tmp / "results" / "study.json").read() == before


def test_a_run_stopped_before_its_results_continues_and_gives_the_same_records(done, model):
    tmp, commands, output = done
    result = tmp / "results" / "study" / "dpo-seed1.json"
    kept = json.load(open(result))["records"]
    result.unlink()
    # trained again (a fresh run: its checkpoints were deleted), then the evaluation fails: no results, checkpoints kept
    with pytest.raises(UserError, match="failed"):
        run_study(tmp, model, fail="evaluate.py")
    assert not result.exists() and len(list((tmp / "work" / "dpo-seed1").glob("step_*"))) == STEPS
    commands, output = run_study(tmp, model)
    assert len(commands) == 2 and "--resume" in commands[0]  # the finished training is not repeated
    assert json.load(open(result))["records"] == kept  # on the CPU a run replicates bit for bit


def test_a_study_made_with_other_flags_is_refused(done, model):
    tmp, commands, output = done
    train, evaluate = flags(model)
    with pytest.raises(UserError, match="dpo-seed0.json was made with"):
        run_study(tmp, model, f"--train={train} --beta 0.2")


def test_the_differences_from_the_first_configuration_are_paired_by_seed_and_step(tmp_path):
    import random
    rng = random.Random(0)
    records = [{"config": c, "seed": s, "step": t, "gold": rng.random(), "win_rate": rng.random(),
                "kl": 10 * t * (1 + i) * rng.uniform(0.5, 1.5), "mean_length": 9.0, "baseline_gold": 0.1 * s}
               for i, c in enumerate(CONFIGS) for s in (0, 1, 2) for t in (1, 2)]  # the second goes further
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        study.report(records, CONFIGS, str(tmp_path / "study.json"))
    first, other = ({(r["seed"], r["step"]): r for r in records if r["config"] == c} for c in CONFIGS)
    seen = []
    for step in (1, 2):
        line = next(x for x in output.getvalue().splitlines() if x.startswith(f"{CONFIGS[1]:<28} {step:>4}")
                    and "gold" in x)
        same_step = [other[(s, step)]["gold"] - first[(s, step)]["gold"] for s in (0, 1, 2)]
        assert f"gold {statistics.mean(same_step):+.3f} ± {statistics.stdev(same_step) / math.sqrt(3):.3f}" in line
        matched = []
        for s in (0, 1, 2):  # the first configuration's gold at this point's KL on its curve in step order: the mean
            curve = [(0.0, 0.1 * s)] + [(first[(s, t)]["kl"], first[(s, t)]["gold"]) for t in (1, 2)]  # of crossings
            kl = other[(s, step)]["kl"]
            crossed = [(g0 * (k1 - kl) + g1 * (kl - k0)) / (k1 - k0) for (k0, g0), (k1, g1) in zip(curve, curve[1:])
                       if (k0 - kl) * (k1 - kl) < 0]  # no KL here is exactly a point's
            if crossed:
                matched.append(other[(s, step)]["gold"] - sum(crossed) / len(crossed))
        seen.append(len(matched))
        if len(matched) > 1:
            se = statistics.stdev(matched) / math.sqrt(len(matched))
            assert f"at the same KL {statistics.mean(matched):+.3f} ± {se:.3f} (p " in line
            assert f") in {len(matched)} of 3" in line
        elif not matched:
            assert "at the same KL: none of 3" in line
    assert seen[0] > 1 and seen[1] < 3  # both branches exercised: within the first's curve, and beyond it
