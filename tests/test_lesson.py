"""LESSON.md cannot rot: each part's command runs (in a reduced form where the full one takes minutes) and prints
what the lesson tells students to look for; each exercise's grading command selects every test of its function (that
the graders catch typical mistakes is tests/test_graders.py's)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # runs train.py or other scripts: `make test` runs these, `make test-fast` not

LESSON = open(os.path.join(ROOT, "LESSON.md")).read()
COMMANDS = re.findall(r"```bash\n(.*?)```", LESSON, re.S)  # one per part, in order

# (part, what to replace for the reduced form: the tiny model, fewer steps, pairs and prompts; what to look for)
PARTS = [
    (1, [], [r"h   \+0\.0   loss 0\.6931   dL/dh -0\.0500   weight sigmoid\(-beta h\) 0\.500"]),
    (2, [("--width 2", "--width 2 --steps 100")], [r"^dpo ", r"^tr_dpo "]),
    (3, [], [r"torch\.float32 .* 0\.997140\d .* 0\.997140\d", r"torch\.bfloat16 .* 0\.9921875 "]),
    (4, [("--max_steps 8", "--max_steps 3"), ("--tau 4", "--tau 2"), ("--eval_pairs 16", "--eval_pairs 4"),
         ("python train.py", f"python train.py --model {TINY}")],
     [r"step 2: reference updated \(1 so far\)", r"step 1 loss 0\.6931 .*rewards/margins 0 ", r"wrote .*curves\.png",
      # the reference's drift after the copy is the policy's at the copy: the trust region's centre jumps
      r"^step 2 .*drift/rejected (\S+) .*\n(?:.*\n)*?step 3 .*drift/reference_rejected \1$"]),
    (5, [("step_000008", "step_000003"), ("--baseline smollm2-135m-instruct", f"--baseline {TINY}"),
         ("--n_prompts 32", "--n_prompts 4"), ("--n_pairs 32", "--n_pairs 4"), ("--max_new_tokens 32",
                                                                                "--max_new_tokens 8")],
     [r"wrote .*results\.json", r"wrote .*win_rate_vs_kl\.png"]),
    (6, [("python train.py", f"python train.py --model {TINY}")],
     [r"warning: the reference will never move \(2 steps < tau 512\): this run is vanilla IPO, not TR-IPO",
      r"^step 1 loss 25 .*rewards/margins 0 "]),
]


def test_the_lesson_has_one_command_per_part():
    assert len(COMMANDS) == len(PARTS) == len(re.findall(r"^## Part \d", LESSON, re.M))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("lesson")


@pytest.mark.parametrize("part, reductions, expected", PARTS, ids=[f"part{p}" for p, _, _ in PARTS])
def test_each_part_runs_and_prints_what_the_lesson_says(part, reductions, expected, out):
    command = COMMANDS[part - 1].replace("out/lesson", str(out))
    for old, new in reductions:
        assert old in command, f"part {part}: the lesson's command changed; update this test's reduction {old!r}"
        command = command.replace(old, new)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    for pattern in expected:
        assert re.search(pattern, log, re.M), f"part {part}: {pattern!r} not in\n{log[-3000:]}"


# the exercises' table, one `-k word` per function; and the invariants' command ("Predict, then check")
EXERCISES = re.findall(r"^\| `(\w+)` \| `\w+\.py` \| `python -m pytest -q (tests/\S+) -k (\w+)` \|$", LESSON, re.M)
INVARIANTS = re.findall(r"`python -m pytest -q (tests/test_train\.py) -k \"([^`\"]+)\"`", LESSON)


def test_each_exercise_is_graded_by_one_word_that_selects_every_test_of_its_file_once():
    """pytest -k WORD selects a test whose name holds WORD (any case): each test of a grader file must be selected by
    exactly one exercise, so that no check of a function is left out of its grading command and none grades two."""
    files = sorted({path for _, path, _ in EXERCISES} | {path for path, _ in INVARIANTS})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", *files], capture_output=True,
                            text=True, cwd=ROOT)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert [f for f, _, _ in EXERCISES] == ["dpo_loss", "ipo_loss", "kto_loss", "update_reference", "should_update"], \
        f"LESSON.md's exercises table, one row per function with one -k word: {EXERCISES}"
    for path in {path for _, path, _ in EXERCISES}:
        for test in (i for i in ids if i.startswith(path)):
            graders = [f for f, p, word in EXERCISES if p == path and word.lower() in test.split("::")[-1].lower()]
            assert len(graders) == 1, f"{test} is selected by the grading command of {graders or 'no exercise'}"
    for function, path, word in EXERCISES:
        assert any(i.startswith(path) and word in i.split("::")[-1] for i in ids), \
            f"{function}: pytest {path} -k {word} selects no test"
    assert INVARIANTS, "LESSON.md's invariants command is gone"
    for path, expression in INVARIANTS:  # words joined by "or", as pytest -k reads them
        for word in expression.split(" or "):
            assert any(i.startswith(path) and word in i.split("::")[-1] for i in ids), \
                f"pytest {path} -k {expression!r}: {word!r} selects no test"
