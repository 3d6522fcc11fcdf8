"""plot.py draws what a run logged, and says where it draws something else: a tie (every margin exactly 0) at 1/2
instead of TRL's strict-> 0; the reference's own drift beside the policy's; the win rate's standard error."""
import json
import os

import pytest

import plot
from conftest import ROOT


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
