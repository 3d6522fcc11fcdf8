"""plot.py draws what a run logged, and says where it draws something else: a tie (every margin exactly 0) at 1/2,
off the line, instead of TRL's strict-> 0; the reference's own drift as the step function it is; the win rate's
standard error. metrics.py declares every key a run logs, once: the panels and the grid come from it."""
import json
import math
import os

import pytest

import plot
from conftest import PAIRS, ROOT, TINY, train_py
from losses import METHODS
from metrics import METRICS


@pytest.mark.parametrize("key, record, tie", [
    ("rewards/accuracies", {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0}, True),
    ("rewards/accuracies", {"rewards/chosen": 0.01, "rewards/rejected": -0.02, "rewards/accuracies": 0.0}, False),
    ("eval/rewards/accuracies", {"eval/rewards/margins": 0.0, "eval/rewards/accuracies": 0.0}, True),
    ("eval/rewards/accuracies", {"eval/rewards/margins": 0.003, "eval/rewards/accuracies": 0.0}, False),
    ("drift/accuracies", {"drift/chosen": 0.0, "drift/rejected": 0.0, "drift/accuracies": 0.0}, True),
    ("drift/accuracies", {"drift/chosen": 0.0, "drift/rejected": -0.5, "drift/accuracies": 0.0}, False),
    ("loss", {"loss": 0.6931}, False),  # only accuracies have ties
])
def test_a_tie_is_an_accuracy_whose_rewards_are_all_exactly_zero(key, record, tie):
    assert plot.is_tie(key, record) == tie, f"plot.is_tie({key!r}, {record}): expected {tie}"


def run_folder(tmp_path, method, records):
    folder = tmp_path / method
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps({"method": method, "alpha": 1.0, "tau": 2}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def test_curves_draw_the_reference_drift_and_runs_logged_before_it(tmp_path):
    evaluation = {"eval/rewards/accuracies": 0.0, "eval/rewards/margins": 0.0, "drift/chosen": 0.0,
                  "drift/rejected": 0.0, "drift/accuracies": 0.0}
    train = {"loss": 0.6931, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
             "rewards/accuracies": 0.0}
    new = run_folder(tmp_path, "tr_dpo", [  # the reference's drift: 0 until the copy after step 2, then the policy's
        {"step": 1, **train, "eval/step": 0, **evaluation, "drift/reference_chosen": 0.0,
         "drift/reference_rejected": 0.0},
        {"step": 3, **train, "loss": 0.69, "eval/step": 3, **evaluation, "eval/rewards/margins": 0.01,
         "drift/chosen": -0.1, "drift/rejected": -0.4, "drift/reference_chosen": -0.05,
         "drift/reference_rejected": -0.2}])
    old = run_folder(tmp_path, "dpo", [{"step": 1, **train, "eval/step": 0, **evaluation}])  # before the metric
    out = plot.plot([new, old], str(tmp_path / "curves.png"))
    assert os.path.getsize(out) > 10_000, f"{out}: no figure"


def test_quality_vs_kl_draws_the_shipped_results_with_their_standard_errors(tmp_path):
    results = [os.path.join(ROOT, "results", name) for name in ("overopt_results.json", "overopt_seed1_results.json")]
    for path in results:
        rows = [r for r in json.load(open(path)) if r["run"] != "baseline"]
        assert rows and all(0 < r["win_rate_se"] < 0.1 for r in rows), f"{path}: a win rate without its s.e."
    out = plot.quality_vs_kl(results, str(tmp_path / "q.png"))
    assert os.path.getsize(out) > 10_000, f"{out}: no figure"


def test_a_tie_is_a_gap_in_the_line_and_a_measured_half_is_on_it():
    records = [{"step": 1, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0},  # a tie
               {"step": 2, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/accuracies": 0.5},  # measured
               {"step": 3, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0},  # a tie
               {"step": 4, "rewards/chosen": 0.2, "rewards/rejected": -0.1, "rewards/accuracies": 0.75}]
    x, y = plot.series("rewards/accuracies", records)
    assert x == [1, 2, 3, 4] and math.isnan(y[0]) and y[1] == 0.5 and math.isnan(y[2]) and y[3] == 0.75, y
    assert plot.lone(plot.measured("rewards/accuracies", records)) == [(2, 0.5), (4, 0.75)]  # no line: a dot


def evaluations(drifts, last, updates=None, every=4):
    """A run's log records, every `every` steps up to `last`, each repeating the latest of the evaluations `drifts`
    ({eval step: the reference's drift}), and each carrying the reference updates applied since the one before, as
    train.py records them ({step: weight}; None: a vanilla run, which records none)."""
    records, before = [], 0
    for s in [1, *range(every, last + 1, every)]:
        latest = max(e for e in drifts if e <= s)
        records.append({"step": s, "loss": 0.6, "eval/step": latest, "drift/reference_chosen": drifts[latest]})
        if updates is not None:
            records[-1]["ref_updates/applied"] = [[u, w] for u, w in updates.items() if before < u <= s]
        before = s
    return records


@pytest.mark.parametrize("updates, drifts, expected", [
    # a copy after steps 16 and 32, evaluations at 0, 20, 40: the reference is flat, and jumps at the copies
    ({16: 1.0, 32: 1.0}, {0: 0.0, 20: -3.0, 40: -7.0}, ([0, 16, 16, 32, 32, 40], [0, 0, -3, -3, -7, -7])),
    ({16: 0.5, 32: 0.5}, {0: 0.0, 20: -2.0, 40: -4.0}, ([0, 16, 16, 32, 32, 40], [0, 0, -2, -2, -4, -4])),
    # a copy every 8: nothing measured the references of steps 9-16 and 17-24 (a gap), nor of 33-40
    ({s: 1.0 for s in range(8, 41, 8)}, {0: 0.0, 8: 0.0, 28: -5.0},
     ([0, 8, 8, 16, 24, 32, 32], [0, 0, math.nan, math.nan, -5, -5, math.nan])),
    # copies where a measurement called for them (a drift-triggered rule): at 5 and 23, whatever any flag says
    ({5: 1.0, 23: 1.0}, {0: 0.0, 20: -3.0, 40: -7.0}, ([0, 5, 5, 23, 23, 40], [0, 0, -3, -3, -7, -7])),
    ({s: 0.5 for s in range(1, 41)}, {0: 0.0, 20: -3.0, 40: -7.0}, ([0, 20, 40], [0, -3, -7])),  # every step: glides
    ({}, {0: 0.0, 20: 0.0, 40: 0.0}, ([0, 40], [0, 0])),  # a TR run whose reference never moved
    (None, {0: 0.0, 20: 0.0, 40: 0.0}, ([0, 20, 40], [0, 0, 0])),  # vanilla: the reference never moves
    # a TR run logged before updates were recorded: its measurements joined, never one value drawn over the whole run
    (None, {0: 0.0, 20: -3.0, 40: -7.0}, ([0, 20, 40], [0, -3, -7])),
])
def test_the_reference_drift_is_flat_between_updates_and_jumps_at_each(updates, drifts, expected):
    x, y = plot.series("drift/reference_chosen", evaluations(drifts, 40, updates))
    assert x == expected[0], x
    assert all(a == b or math.isnan(a) and math.isnan(b) for a, b in zip(y, expected[1])), y


@pytest.mark.parametrize("updates, marks, named", [
    ({5: 1.0, 23: 1.0}, [5, 23], "2 updates (copy)"),  # where a measurement called for them, not where tau says
    ({16: 1.0, 32: 1.0}, [16, 32], "hard copy every 16"),
    ({16: 0.6, 32: 0.6}, [16, 32], "alpha 0.6 every 16"),
    ({s: 0.1 for s in range(1, 41)}, [], "soft, alpha 0.1 every step"),  # a mark at every step: the legend says it
    ({16: 0.0, 32: 0.0}, [], "the reference never moved"),  # alpha 0: applied, moves nothing
])
def test_the_reference_updates_marked_and_named_are_those_the_run_recorded_not_its_flags(updates, marks, named,
                                                                                           tmp_path):
    args, records = plot.read_run(run_folder(tmp_path, "tr_dpo", evaluations({0: 0.0}, 40, updates)))  # tau 2
    recorded = plot.reference_updates(records)
    assert [s for s, _ in recorded] == [s for s, w in updates.items() if w > 0]
    assert (marks == []) == (not recorded or plot.every_step(recorded, 40))
    assert plot.label("run", args["method"], recorded, 40) == f"run (tr_dpo, {named})"


def test_the_figure_marks_the_updates_the_run_recorded(tmp_path):
    folder = run_folder(tmp_path, "tr_dpo", evaluations({0: 0.0}, 40, {5: 1.0, 23: 1.0}))  # args.json: tau 2
    panels, (legend,) = cells(plot.figure([folder]))
    assert sorted({line.get_xdata()[0] for line in panels[0].get_lines() if line.get_linestyle() == ":"}) == [5, 23]
    assert "tr_dpo (tr_dpo, 2 updates (copy))" in [t.get_text() for t in legend.get_legend().get_texts()]


def test_a_run_logged_before_the_updates_were_recorded_is_named_without_them(tmp_path):
    folder = run_folder(tmp_path, "tr_dpo", evaluations({0: 0.0}, 8))  # no ref_updates/applied in its records
    args, records = plot.read_run(folder)
    assert plot.reference_updates(records) is None
    assert plot.label("old", "tr_dpo", plot.reference_updates(records), 8) == "old (tr_dpo)"


def cells(fig):
    """(panel axes, legend axes): the drawn panels, and the cell that holds the runs' legend."""
    panels = [ax for ax in fig.axes if ax.axison]
    legends = [ax for ax in fig.axes if ax.get_legend() and "reference update" in
               [t.get_text() for t in ax.get_legend().get_texts()]]
    return panels, legends


@pytest.mark.parametrize("extra", [0, 1, 4])
def test_the_grid_has_a_panel_for_every_declared_panel_and_a_cell_of_its_own_for_the_legend(extra, tmp_path,
                                                                                              monkeypatch):
    """A panel added to metrics.py (here: `extra` new metrics, a panel each) gets a cell of its own; none is drawn
    under the legend, or over another panel."""
    for i in range(extra):
        monkeypatch.setitem(METRICS, f"new/metric_{i}", ("a metric added later", f"new panel {i}", "-"))
    records = [{"step": s, **{k: 0.5 - 0.01 * s for k in METRICS if k != "step"}, "ref_updates/applied": [[s, 1.0]]}
               for s in (1, 2, 3)]  # (the updates a record carries are a list)
    folder = run_folder(tmp_path, "tr_dpo", records)
    fig = plot.figure([folder])
    panels, legends = cells(fig)
    assert [ax.get_title() for ax in panels] == list(plot.panels()), "a panel missing, or drawn in another's cell"
    assert len(legends) == 1 and legends[0] not in panels
    boxes = [ax.get_position() for ax in panels + legends]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "cells overlap"
    assert all(any(len(line.get_xdata()) for line in ax.get_lines()) for ax in panels), "an empty panel"


# ---------------------------------------------------------------------------------------------------------------
# against train.py itself: tiny runs (conftest.train_py)
TINY_RUN = ["--model", TINY, "--dataset", PAIRS, "--eval_pairs", "8", "--batch_size", "4", "--micro_batch_size", "2",
            "--log_interval", "1", "--max_length", "64", "--max_prompt_length", "48", "--lr", "1e-3",
            "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """tiny_run(*flags) -> the run's folder: train.py on the tiny model, once per set of flags in this module."""
    done = {}

    def get(*flags):
        if flags not in done:
            out = tmp_path_factory.mktemp("run")
            status, log = train_py(*TINY_RUN, *flags, "--out_dir", out)
            assert status == 0, log[-4000:]
            done[flags] = str(out)
        return done[flags]
    return get


HARD = ("--method", "tr_dpo", "--tau", "2", "--max_steps", "6")  # copies after steps 2 and 4 (and 6)


@pytest.mark.slow
def test_every_key_a_run_logs_is_declared_in_metrics_py_and_every_declared_key_is_logged(tiny_run):
    logged = set()
    for method in ["sft", *(f"tr_{m}" for m in METHODS)]:  # every method a run may log a key of its own for
        flags = HARD + ("--eval_interval", "1") if method == "tr_dpo" else ("--method", method, "--max_steps", "2")
        logged |= {k for line in open(os.path.join(tiny_run(*flags), "metrics.jsonl")) for k in json.loads(line)}
    assert not logged - set(METRICS), f"logged but not declared in metrics.py: {sorted(logged - set(METRICS))} " \
                                      "(declare each: what it means, the panel that draws it or None)"
    assert not set(METRICS) - logged, f"declared in metrics.py but no run logs it: {sorted(set(METRICS) - logged)}"


@pytest.mark.slow
def test_the_reference_drift_drawn_from_a_few_evaluations_is_the_one_measured_at_every_step(tiny_run):
    """Evaluations at steps 0, 3 and 6 alone draw the reference's drift at every step as an evaluation after every
    step measures it: the one the step trained with, constant from one copy to the next."""
    every_step = plot.read_run(tiny_run(*HARD, "--eval_interval", "1"))[1]
    _, records = plot.read_run(tiny_run(*HARD, "--eval_interval", "3"))
    for key in ("drift/reference_chosen", "drift/reference_rejected"):
        x, y = plot.series(key, records)
        assert x == [0, 2, 2, 4, 4, 6], x  # flat pieces, a jump at each copy
        for r in every_step:  # the piece holding step s: from the copy before s to the copy at or after it
            drawn = [b for a, b, c in zip(x, y, x[1:]) if a < r["eval/step"] <= c or r["eval/step"] == a == 0]
            assert drawn and drawn[0] == pytest.approx(r[key], abs=1e-6), (key, r["eval/step"], drawn, r[key])


def logged_keys():
    """The keys train.py's code puts in a log record (the dicts of losses_and_metrics, held_out_metrics and
    write_record) and those a reference rule adds to it (ref_update.py: record[...], record.setdefault(...)), read
    from the code: a fast stand-in for running every method."""
    import ast
    keys = set()
    for script, functions in (("train.py", ("losses_and_metrics", "held_out_metrics", "write_record")),
                              ("ref_update.py", None)):
        for f in ast.walk(ast.parse(open(os.path.join(ROOT, script)).read())):
            if not isinstance(f, ast.FunctionDef) or functions and f.name not in functions:
                continue
            for node in ast.walk(f):
                if functions and isinstance(node, ast.Dict):
                    keys |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
                elif not functions and isinstance(node, ast.Call) and getattr(node.func, "attr", None) == \
                        "setdefault" and getattr(node.func.value, "id", None) == "record":
                    keys.add(node.args[0].value)
                elif not functions and isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "record":
                    keys.add(node.slice.value)
    return keys


def test_every_key_train_py_logs_is_declared_and_every_declared_key_is_in_its_code():
    logged = logged_keys()
    assert {"loss", "drift/chosen", "ref_updates/applied"} <= logged  # the scan reads the three and the rule
    assert not logged - set(METRICS), f"logged but not declared in metrics.py: {sorted(logged - set(METRICS))}"
    assert not set(METRICS) - logged, f"declared in metrics.py but not logged: {sorted(set(METRICS) - logged)}"
