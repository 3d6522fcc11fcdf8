"""Nothing lost, nothing silent: signals, non-finite steps, dead ranks, odd tokenizers, bad data through train.py."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import PAIRS, ROOT, TINY, train_py
from guards import STOPPED
from test_train import TINY_RUN, train

pytestmark = pytest.mark.slow  # runs train.py or other scripts: `make test` runs these, `make test-fast` not


def records(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_sigterm_logs_the_partial_interval_saves_at_a_step_boundary_and_resume_is_bit_exact(tmp_path):
    tr = ["--method", "tr_dpo", "--alpha", "0.5", "--tau", "1", "--max_steps", "12"]
    straight, _ = train(tmp_path / "straight", *tr)  # a record every step
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY_RUN, *tr, "--log_interval", "100",
                             "--out_dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # a real process, mid-training
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == STOPPED and "stopped by a signal after step" in log and "Traceback" not in log, log
    logged = records(out)
    stopped = logged[-1]["step"]  # stopped between two log lines: step 1's and step 100's
    assert [r["step"] for r in logged] == [1, stopped] and stopped < 12
    assert (out / f"step_{stopped:06d}" / "state.pt").exists()
    partial = [r["loss"] for r in straight[1:stopped]]  # steps 2..stopped: their record was written before saving
    assert logged[1]["loss"] == pytest.approx(sum(partial) / len(partial), rel=1e-9)
    resumed, log = train(out, *tr, "--resume")
    assert f"resuming from {out / f'step_{stopped:06d}'}" in log
    assert [r["loss"] for r in resumed[2:]] == [r["loss"] for r in straight[stopped:]]  # as the uninterrupted run


def test_every_checkpoint_has_its_record_and_a_resume_after_a_hard_kill_logs_each_step_once(tmp_path):
    flags = ["--max_steps", "3", "--log_interval", "4", "--save_interval", "2"]
    logged, _ = train(tmp_path, *flags)
    assert [r["step"] for r in logged] == [1, 2, 3]  # step 2: the record of its checkpoint, though not a log step
    shutil.rmtree(tmp_path / "step_000003")  # killed after step 3's record, before its checkpoint, and cut mid-line:
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    resumed, log = train(tmp_path, *flags, "--resume")
    assert f"resuming from {tmp_path / 'step_000002'}" in log
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed == logged[:2] + [{**logged[2], "tokens_per_s":
                                                                                      resumed[2]["tokens_per_s"]}]


def test_resume_auto_is_one_command_for_a_requeue_loop(tmp_path):
    """The first launch, a launch after a job killed before its first checkpoint, a resume, a finished run."""
    flags = ["--max_steps", "2", "--resume", "auto"]
    assert [r["step"] for r in train(tmp_path, *flags)[0]] == [1, 2]  # nothing to resume: a fresh run
    shutil.rmtree(tmp_path / "step_000002")  # what a kill before the first checkpoint leaves: args.json, metrics...
    status, log = train_py(*TINY_RUN, "--max_steps", "2", "--resume", "--out_dir", tmp_path)
    assert status == 1 and "--resume found no complete checkpoint" in log and "--resume auto" in log
    assert [r["step"] for r in train(tmp_path, *flags)[0]] == [1, 2]  # started over, not appended to
    logged, log = train(tmp_path, "--max_steps", "3", "--resume", "auto")
    assert f"resuming from {tmp_path / 'step_000002'}" in log and [r["step"] for r in logged] == [1, 2, 3]
    status, log = train_py(*TINY_RUN, "--max_steps", "3", "--resume", "auto", "--out_dir", tmp_path)
    assert status == 0 and "is complete: step 3 of 3" in log


def test_resume_auto_refuses_a_folder_holding_another_runs_record_without_a_checkpoint(tmp_path):
    """study.py deletes a finished run's checkpoints and keeps its records, and users prune checkpoints to save disk:
    --resume auto of another run into such a folder reads its args.json and is refused, the records left as they were
    (with a checkpoint the same command is refused the same way)."""
    train(tmp_path, "--method", "dpo", "--max_steps", "1")
    shutil.rmtree(tmp_path / "step_000001")
    kept = {name: (tmp_path / name).read_bytes() for name in ("args.json", "metrics.jsonl", "memory.json")}
    status, log = train_py(*TINY_RUN, "--method", "ipo", "--max_steps", "1", "--resume", "auto", "--out_dir", tmp_path)
    assert status == 1 and "Traceback" not in log and "--method 'dpo' in the checkpoint, 'ipo' now" in log, log[-2000:]
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept


def test_overwrite_never_deletes_the_model_the_run_trains_from(tmp_path):
    """The non-finite stop's advice, a fresh run from a checkpoint's policy/, typed into the same --out_dir with
    --overwrite: refused before anything loads, the checkpoint kept (it used to train, deleting its own --model)."""
    train(tmp_path, "--max_steps", "1")
    policy = tmp_path / "step_000001" / "policy"
    status, log = train_py(*TINY_RUN, "--model", policy, "--max_steps", "1", "--overwrite", "--out_dir", tmp_path)
    assert status == 1 and "Traceback" not in log, log[-2000:]
    assert f"--model {policy} lies in {tmp_path / 'step_000001'}, which this command would delete" in log
    assert (policy / "model.safetensors").exists()


def test_nonfinite_loss_stops_with_step_rows_and_last_good_checkpoint_and_ways_out_that_work(tmp_path):
    # lr 1e30: step 1 is finite but throws the weights to ~1e30, so step 2's forward overflows
    flags = [*TINY_RUN, "--lr", "1e30", "--max_steps", "5", "--out_dir", tmp_path / "run"]
    status, log = train_py(*flags)
    assert status == 1 and "Traceback" not in log
    assert "error: non-finite step 2" in log and "pairs.jsonl:" in log
    assert (tmp_path / "run" / "step_000001" / "state.pt").exists() and not (tmp_path / "run" / "step_000002").exists()
    error = next(line for line in log.splitlines() if line.startswith("error: non-finite"))
    # the ways out it names are accepted: a resume with --skip_nonfinite (a resume refuses another --lr)...
    assert "--resume --skip_nonfinite N" in error
    status, log = train_py(*flags, "--resume", "--skip_nonfinite", "1")
    assert f"resuming from {tmp_path / 'run' / 'step_000001'}" in log and "warning: skipped step 2" in log, log
    # ...or a fresh run from the saved policy, in another folder (here it too overflows: the weights are ~1e30)
    policy = re.search(r"--model (\S+/policy) ", error).group(1)
    assert policy == str(tmp_path / "run" / "step_000001" / "policy")
    status, log = train_py(*TINY_RUN, "--model", policy, "--max_steps", "1", "--out_dir", tmp_path / "fresh")
    assert "memory after building the models" in log and "Traceback" not in log, log


def test_skip_nonfinite_counts_skipped_steps_and_gives_up_past_the_limit(tmp_path):
    status, log = train_py(*TINY_RUN, "--lr", "1e30", "--max_steps", "5", "--skip_nonfinite", "3", "--out_dir",
                           tmp_path)
    assert status == 1
    assert log.count("warning: skipped step 2") == 3 and "(3 of at most 3" in log and "error: non-finite step 2" in log


def torchrun_mid_training(out_dir, *flags):
    """A real 2-process run, once it has logged a step, and the pid of its rank 1 (found by its environment)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *TINY_RUN, *flags, "--out_dir", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    metrics = out_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"train.py" in cmd and str(out_dir).encode() in cmd and b"LOCAL_RANK=1" in env:
            return proc, int(pid)
    raise AssertionError("rank 1 not found")


def test_a_rank_that_dies_makes_the_others_exit(tmp_path):
    proc, rank1 = torchrun_mid_training(tmp_path, "--max_steps", "100000")
    os.kill(rank1, signal.SIGKILL)
    start = time.time()
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and time.time() - start < 120, log


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    proc, rank1 = torchrun_mid_training(tmp_path, "--max_steps", "100000")
    os.kill(rank1, signal.SIGTERM)  # rank 0 gets no signal: it must learn of it and stop at the same step
    log = proc.communicate(timeout=300)[0]
    assert f"exitcode  : {STOPPED}" in log and "stopped by a signal after step" in log, log  # each worker's status
    stopped = records(tmp_path)[-1]["step"]
    assert (tmp_path / f"step_{stopped:06d}" / "state.pt").exists() and "identical on all 2 ranks" in log


def test_ctrl_c_to_torchrun_saves_at_a_step_boundary_then_torchrun_exits_1(tmp_path):
    """Ctrl-C in a terminal signals the foreground process group: torchrun, which forwards SIGINT to its workers (each
    in a session of its own) and kills them --shutdown-timeout seconds later (default 30). The workers finish the
    step, save and exit STOPPED; torchrun itself ends with its SignalException traceback and status 1, as the README says."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *TINY_RUN, "--max_steps", "100000", "--out_dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)  # its own process group, as a shell's foreground job
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and "SignalException" in log and "KeyboardInterrupt" not in log, log
    stopped = records(tmp_path)[-1]["step"]
    assert f"stopped by a signal after step {stopped}" in log and (tmp_path / f"step_{stopped:06d}" / "state.pt").exists()


@pytest.mark.parametrize("under_torchrun, saving, second_ctrl_c_stops_at_once", [
    (False, False, True), (False, True, False), (True, False, False)])
def test_a_second_ctrl_c_stops_at_once_only_under_plain_python_and_never_mid_save(under_torchrun, saving,
                                                                                  second_ctrl_c_stops_at_once):
    from guards import StopSignals
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signals = StopSignals(under_torchrun)
        signals.handle(signal.SIGINT, None)
        assert signals.requested
        signals.saving = saving
        try:
            signals.handle(signal.SIGINT, None)  # under torchrun: the launcher's forwarded copy, or a second Ctrl-C
            stopped = False
        except KeyboardInterrupt:
            stopped = True
        assert stopped == second_ctrl_c_stops_at_once
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_tokenizer_without_pad_token_or_chat_template_and_tied_embeddings_are_said_once(tmp_path):
    from transformers import AutoTokenizer
    from locate import DEFAULT_MODEL, resolve
    from model import load_model
    folder = tmp_path / "model"
    load_model(TINY).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL))
    tokenizer.chat_template, tokenizer.pad_token = None, None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    flags = [f for f in TINY_RUN]
    flags[flags.index("--model") + 1] = str(folder)
    status, log = train_py(*flags, "--max_steps", "2", "--out_dir", tmp_path / "out")
    assert status == 0, log[-2000:]
    for note in ("has no pad token", "has no chat template", "embeddings are tied"):
        assert log.count(note) == 1, note


def test_bad_data_under_torchrun_is_rank_0s_message_alone_and_rank_0_is_the_root_cause(tmp_path):
    """Rank 0 reads the data first; the other ranks wait. They exit without a word (they printed a gloo traceback each
    when rank 0 left), after rank 0, which torchrun's report names as the root cause."""
    path = tmp_path / "bad.jsonl"
    path.write_text(open(PAIRS).read() + '{"prompt": "x", "chosen": "y"}\n')
    flags = [f for f in TINY_RUN]
    flags[flags.index("--dataset") + 1] = str(path)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *flags, "--out_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    print(f"{len(result.stderr.splitlines())} lines of stderr")
    assert result.returncode == 1 and "bad.jsonl:42: missing field(s) rejected" in result.stderr
    workers = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert workers and all(line.startswith("[rank0]: ") for line in workers), result.stderr  # rank 1: nothing
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr  # torchrun's own
    assert "rank      : 0 (local_rank: 0)" in result.stderr[result.stderr.index("Root Cause"):]


def test_bad_data_stops_train_py_with_file_and_line_and_no_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(open(PAIRS).read() + '{"prompt": "x", "chosen": "y"}\n')
    flags = [f for f in TINY_RUN]
    flags[flags.index("--dataset") + 1] = str(path)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "bad.jsonl:42: missing field(s) rejected" in result.stderr
    status, log = train_py(*flags, "--skip_bad_rows", "--max_steps", "1", "--out_dir", tmp_path / "o")
    assert status == 0 and "skipped 1 bad row(s) of 42" in log
