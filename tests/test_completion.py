"""A run is finished when its checkpoints say so (checkpoint.finished), never because a command exited 0: a training
stopped by a signal saves a checkpoint and is continued, never evaluated and recorded as done. Fast: the checkpoints
here are their state.pt's counters alone."""
import json
import os
import sys
import types

import pytest
import torch

import checkpoint
import study
from guards import STOPPED, UserError


def saved(out_dir, step, max_steps):
    """A checkpoint of a run of `max_steps` steps at `step`, as far as completion is concerned."""
    folder = out_dir / f"step_{step:06d}"
    os.makedirs(folder / "policy", exist_ok=True)
    torch.save({"step": step, "run": {"method": "dpo", "max_steps": max_steps}}, folder / "state.pt")


def test_a_run_is_finished_when_its_latest_complete_checkpoint_is_at_its_last_step(tmp_path):
    assert not checkpoint.finished(tmp_path)  # no checkpoint yet
    saved(tmp_path, 1, 2)
    assert not checkpoint.finished(tmp_path)  # stopped after step 1 of 2
    os.makedirs(tmp_path / "step_000002.tmp")  # killed while writing the last one
    assert not checkpoint.finished(tmp_path)
    saved(tmp_path, 2, 2)
    assert checkpoint.finished(tmp_path)
    assert not checkpoint.finished(tmp_path, length=4)  # a resume asked for a longer run


def test_a_training_stopped_by_a_signal_is_never_evaluated_nor_recorded(tmp_path, monkeypatch):
    """train.py stopped by SIGTERM saves its step and exits (0 before, STOPPED now); a launcher may pass any status on.
    The study must stop without a result, its checkpoints kept for the next call to continue."""
    out_dir = tmp_path / "work" / "dpo-seed0"
    commands = []

    def call(command):  # train.py stops after step 1 of 2 and its launcher exits 0
        commands.append(command)
        if command[1].endswith("train.py"):
            saved(out_dir, 1, 2)
        else:
            os.makedirs(out_dir.parent / "dpo-seed0-eval")
            json.dump([{"checkpoint": str(out_dir / "step_000001"), "method": "dpo", "alpha": None, "tau": None,
                        "beta": 0.1, "step": 1, "win_rate": 0.5, "win_rate_se": 0.1, "kl_seq": 0.0, "kl_token": 0.0,
                        "mean_length": 1.0}], open(out_dir.parent / "dpo-seed0-eval" / "results.json", "w"))

    monkeypatch.setattr(study, "call", call)
    args = types.SimpleNamespace(work=str(tmp_path / "work"), launcher=sys.executable, train="", evaluate="")
    result = tmp_path / "dpo-seed0.json"
    with pytest.raises(UserError, match="stopped before its last step"):
        study.run("--method dpo", 0, args, str(result))
    assert not result.exists() and len(commands) == 1  # not evaluated, nothing recorded
    assert checkpoint.completed(out_dir)  # kept: the next call continues it with --resume


def test_a_stopped_training_has_its_own_exit_status():
    assert STOPPED not in (0, 1, 2)  # not success, a failure, nor argparse's refusal


def test_a_signal_stops_a_run_that_skips_every_step_saved_and_resumable():
    """--skip_nonfinite N with every step non-finite skipped on and on, and a SIGTERM was never read: the skip came
    before the loop's stop check. A stop asked for stops the run at that step, saved, with STOPPED."""
    import guards
    saves = []
    totals = {"loss": float("nan"), "grad_norm": 1.0, "stop": 0.0}
    assert guards.check_finite(3, totals, [], 0, 10**9, lambda: saves.append(3) or "step_2", print) is True
    totals["stop"] = 1.0  # the step's sum over ranks of the stop flag
    with pytest.raises(SystemExit) as stopped:
        guards.check_finite(4, totals, [], 1, 10**9, lambda: saves.append(4) or "step_2", print)
    assert stopped.value.code == STOPPED and saves == [4]
