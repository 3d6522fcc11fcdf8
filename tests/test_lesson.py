"""LESSON.md cannot rot: each part's command runs (in a reduced form where the full one takes minutes) and prints
what the lesson tells students to look for; each grading command of the exercises selects tests that exist."""
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
    (4, [("--max_steps 8", "--max_steps 2"), ("--tau 4", "--tau 2"), ("--eval_pairs 16", "--eval_pairs 4"),
         ("python train.py", f"python train.py --model {TINY}")],
     [r"step 2: reference updated \(1 so far\)", r"step 1 loss 0\.6931 .*rewards/margins 0 ", r"wrote .*curves\.png"]),
    (5, [("step_000008", "step_000002"), ("--baseline smollm2-135m-instruct", f"--baseline {TINY}"),
         ("--n_prompts 32", "--n_prompts 4"), ("--n_pairs 32", "--n_pairs 4"), ("--max_new_tokens 32",
                                                                                "--max_new_tokens 8")],
     [r"wrote .*results\.json"]),
    (6, [("python train.py", f"python train.py --model {TINY}")],
     [r"warning: the reference will never move \(2 steps < tau 512\): this run is vanilla IPO, not TR-IPO"]),
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


GRADING = re.findall(r"`python -m pytest -q (tests/\S+) -k \"?([^`\"]+)\"?`", LESSON)  # (file, -k expression)


def test_every_grading_command_selects_tests():
    files = sorted({path for path, _ in GRADING})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", *files], capture_output=True,
                            text=True, cwd=ROOT)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(GRADING) >= 6 and ids, result.stdout
    for path, expression in GRADING:  # the lesson's expressions are words joined by "or", as pytest -k reads them
        words = expression.split(" or ")
        assert all(re.fullmatch(r"\w+", w) for w in words), expression
        assert any(i.startswith(path) and any(w in i.split("::")[-1] for w in words) for i in ids), \
            f"pytest {path} -k {expression!r} selects no test"
