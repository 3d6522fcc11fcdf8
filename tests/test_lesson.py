"""LESSON.md cannot rot: every command it prints, in a fenced block or inline, is found by parsing the lesson and run
here (a new command is run without editing this file), in a reduced form where the full one takes minutes; where the
lesson quotes what a command prints, the output is compared with the quote at the stability the lesson states. Each
exercise's grading command selects every test of its function (that the graders catch typical mistakes is
tests/test_graders.py's)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

LESSON = open(os.path.join(ROOT, "LESSON.md")).read()
SECTIONS = re.split(r"^(?=## )", LESSON, flags=re.M)  # the header (the set-up), then each part and section


def section_name(text):
    heading = re.match(r"## (Part \d+|[^:.\n]+)", text)
    return heading.group(1) if heading else "set-up"


FENCED = [(section_name(text), block.strip()) for text in SECTIONS
          for block in re.findall(r"```bash\n(.*?)```", text, re.S)]  # each part's command, and the set-up's
INLINE = [(section_name(text), span) for text in SECTIONS  # each `span` outside them that a student would type
          for span in re.findall(r"`((?:python|make|git|source|pip|torchrun) [^`]+)`",
                                 re.sub(r"```.*?```", "", text, flags=re.S))]
COMMANDS = list(dict.fromkeys(FENCED + INLINE))  # every command the lesson prints, each once

# How a command runs here, applied to every command that holds the text (so that a new command is reduced alike):
# what installs, trains or discards work is replaced by what checks it; what takes minutes, by a shorter form.
SAFE = [
    (r"\bmake (?=\w)", "make -n "),  # make sets up a venv, trains or runs every test: its dry run checks the target
    (r"\bgit checkout ", "git ls-files --error-unmatch "),  # would discard the working tree's edits: the files exist
    (r"\bpython -m pytest ", "python -m pytest --collect-only "),  # what it selects runs in this suite anyway; it
]                                                                    # must select something (pytest exits 5 if not)
REDUCE = [
    ("python train.py", f"python train.py --model {TINY}"),  # the tiny model for every training run
    ("--max_steps 5 ", "--max_steps 3 "), ("--tau 3 ", "--tau 2 "),  # Part 4's class run
    ("step_000005", "step_000003"),  # Part 5's evaluation of its checkpoint
    ("--max_steps 8 ", "--max_steps 3 "), ("--eval_pairs 16 ", "--eval_pairs 4 "),  # the soft run, at home
    ("--baseline smollm2-135m-instruct", f"--baseline {TINY}"),
    ("--n_prompts 32", "--n_prompts 4"), ("--n_pairs 32", "--n_pairs 4"), ("--max_new_tokens 32", "--max_new_tokens 8"),
    ("toy.py --sweep ", "toy.py --sweep --steps 2 "), ("toy.py --seed 2 ", "toy.py --seed 2 --steps 100 "),
]


def runnable(command, out):
    command = command.replace("out/lesson", str(out))
    for pattern, new in SAFE:
        command = re.sub(pattern, new, command)
    command += " "  # (a reduction may end where the command does)
    for old, new in REDUCE:
        command = command.replace(old, new)
    return command.rstrip(" ")


def run(command):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["bash", "-e", "-c", command], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=900)  # -e: a block of several lines fails at its first failing line
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{command}\nfailed:\n{log[-3000:]}"
    return log


def test_the_code_a_part_shows_is_the_file_its_command_runs():
    """Parts 1 and 3 show their script, then run it as a file (one line on every OS): the two must be the same."""
    shown = re.findall(r"```python\n(.*?)```\s*```bash\npython -m (lesson\.\w+)\n```", LESSON, re.S)
    assert len(shown) >= 2, "LESSON.md no longer shows the scripts of Parts 1 and 3 before running them"
    for code, module in shown:
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        assert code == open(path).read(), f"LESSON.md shows code that differs from {path}, which its command runs"


def test_every_command_is_one_line():
    """A command continued over lines (a heredoc, a backslash) or joined with && does not run as printed in Windows'
    PowerShell: a block of several commands has one on each line."""
    several = [c for _, c in COMMANDS if "\\\n" in c or "&&" in c or "<<" in c] + [c for _, c in INLINE if "\n" in c]
    assert not several, f"LESSON.md prints commands that are not one line each: {several}"


def test_every_reduction_and_expectation_still_applies_to_a_command_of_the_lesson():
    texts = [command + " " for _, command in COMMANDS]
    stale = [old for old in [old for old, _ in REDUCE] + list(EXPECTED) if not any(old in t for t in texts)]
    assert not stale, f"LESSON.md's commands changed: no command holds {stale}; update REDUCE or EXPECTED here"


def test_the_lesson_finds_the_commands_it_prints():
    """The parser sees what a reader sees: one ```bash block per part, and the set-up and warm-up commands."""
    parts = [name for name, _ in COMMANDS if name.startswith("Part")]
    assert sorted(set(parts)) == [f"Part {i}" for i in range(1, 7)], parts
    assert any(name == "set-up" and "make setup" in c for name, c in COMMANDS), "the set-up command is not found"
    assert any("load_model" in c for _, c in COMMANDS), "the warm-up command is not found"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("lesson")


# the first commands of Parts 1-3, run whole by the tests of what they print (below), are not run here again
FULL = [next((s, c) for s, c in FENCED if s == part) for part in ("Part 1", "Part 2", "Part 3")]
RUN_HERE = [(s, c) for s, c in COMMANDS if (s, c) not in FULL]


@pytest.mark.slow  # runs train.py and other scripts: `make test` runs these, `make test-fast` not
@pytest.mark.parametrize("section, command", RUN_HERE, ids=[f"{s}: {c[:60]}" for s, c in RUN_HERE])
def test_every_command_of_the_lesson_runs(section, command, out):
    """Each runs (in the lesson's order: Part 5 evaluates Part 4's checkpoint); a part's command, reduced, still prints
    what the lesson tells students to look for."""
    log = run(runnable(command, out))
    for pattern in [p for key, patterns in EXPECTED.items() if key in command for p in patterns]:
        assert re.search(pattern, log, re.M), f"{section}: {pattern!r} not in\n{log[-3000:]}"


def quoted(part, after="You should see"):
    """The first indented block after `after` in a part: the output the lesson quotes."""
    text = next(t for t in SECTIONS if section_name(t) == part)
    tail = text[text.index(after):]
    block = re.search(r"\n\n((?: {4}.*\n)+)", tail).group(1)
    return [line[4:] for line in block.splitlines()]


def command_of(part):
    return next(c for s, c in FENCED if s == part)


EXPECTED = {  # what a part's command, reduced (the tiny model, fewer steps), must still print; by what it holds
    "--tau 3 ": [r"step 2: reference updated: a copy of the policy", r"step 1 loss 0\.6931 .*rewards/margins 0 ",
                r"wrote .*curves\.png",
                # the reference's drift after the copy is the policy's at the copy: the trust region's centre jumps
                r"^step 2 .*drift/rejected (\S+) .*\n(?:.*\n)*?step 3 .*drift/reference_rejected \1$"],
    "--alpha 0.5": [r"soft update every step: reference <- 0\.5 policy \+ 0\.5 reference \(lags the policy by 1 "
                    r"steps\)",
                    r"^step 1 .*rewards/margins 0 .*ref_updates 1 .*drift/reference_rejected 0$",
                    r"^step 2 .*rewards/margins 0 .*ref_updates 2 .*drift/reference_rejected 0$",
                    # the glide: from step 3 on the margins are not 0 and the reference has left the SFT model
                    r"^step 3 .*rewards/margins (?!0 )\S+ .*ref_updates 3 .*drift/reference_rejected (?!0$)\S+$"],
    "evaluate.py": [r"scoring 4 prompts and 4 pairs of demo \(max_length 512, max_prompt_length 256\), weights in "
                    r"float32, on cpu", r"wrote .*results\.json", r"wrote .*win_rate_vs_kl\.png"],
    "--method tr_ipo": [r"warning: --warmup_steps 5 >= the run's 2 steps: the lr never reaches --lr\n"
                        r"warning: the reference will never move \(2 steps < tau 512\): this run is vanilla IPO, "
                        r"not TR-IPO", r"^step 1 loss 25 .*rewards/margins 0 "],
}


@pytest.mark.slow
@pytest.mark.parametrize("part", ["Part 1", "Part 3"])
def test_exact_outputs_are_printed_to_the_quoted_digit(part, out):
    """Parts 1 and 3 print what the lesson quotes; Part 3's float32 line keeps 6 decimals on every CPU (the lesson
    says the 7th may differ), everything else every digit."""
    log = run(runnable(command_of(part), out))
    for line in quoted(part):
        if part == "Part 3" and line.startswith("torch.float32"):
            pattern = re.sub(r"(\d\\\.\d{6})\d", r"\1\\d", re.escape(line))  # the 7th decimal: any digit
            assert re.search(pattern, log), f"{part}: {line!r} (to 6 decimals) not in\n{log}"
        else:
            assert line in log, f"{part}: {line!r} not in\n{log}"


def toy_rows(lines):
    return {tuple(line.split()[:3]): line.split()[3:] for line in lines if re.match(r"(sft|dpo|tr_dpo) ", line)}


# the rows whose final figures the lesson says vary from CPU to CPU (Part 2), and the range it gives for p(chosen)
SWINGING = {("tr_dpo", "0.1", "1"), ("tr_dpo", "1.0", "8")}


@pytest.mark.slow
def test_the_toy_prints_the_quoted_table_at_the_stated_stability(out):
    """Part 2's full run (about 40 s): every lowest point and its step to the digit, and every final figure but those
    of the rows the lesson names, which must stay within the range it gives."""
    text = " ".join(next(t for t in SECTIONS if section_name(t) == "Part 2").split())
    assert "final figures of the rows alpha 0.1 and tau 8" in text, "Part 2 no longer names its swinging rows"
    low, high = map(float, re.search(r"p\(chosen\) ended between (0\.\d+) and (0\.\d+)", text).groups())
    want, got = toy_rows(quoted("Part 2")), toy_rows(run(command_of("Part 2").replace("out/lesson", str(out)))
                                                     .splitlines())
    for row, figures in want.items():
        assert row in got, f"Part 2: the row {row} is missing from the toy's output"
        if row in SWINGING:
            assert got[row][1:3] == figures[1:3], f"Part 2, row {row}: lowest point {got[row][1:3]}, quoted {figures}"
            assert low <= float(got[row][0]) <= high, f"Part 2, row {row}: p(chosen) {got[row][0]} outside {low}-{high}"
            assert low <= float(figures[0]) <= high, f"Part 2, row {row}: the quoted {figures[0]} outside its range"
        else:
            assert got[row] == figures, f"Part 2, row {row}: printed {got[row]}, quoted {figures}"


def quoted_log(part, after="You should see"):
    """{step: {name: value}} of the log lines a part quotes (step N name value ...)."""
    steps = {}
    for line in quoted(part, after):
        m = re.match(r"step (\d+) (.*)", line)
        if m and ":" not in line.split()[1]:
            words = m.group(2).replace("...", "").split()
            steps[int(m.group(1))] = dict(zip(words[::2], words[1::2]))
    return steps


def test_part4_quotes_what_holds_on_every_cpu():
    """What Part 4's prediction rests on holds in the quoted log to the last printed digit on any CPU: steps 1, 2 and 4
    at exactly log 2 with zero margins, and the reference's drift from step 4 on equal to the policy's at step 3 (the
    same bits: a copy). The other digits are this machine's; the lesson says which are stable."""
    log = quoted_log("Part 4")
    for step in (1, 2, 4):
        assert log[step]["loss"] == "0.6931" and log[step]["rewards/margins"] == "0", f"Part 4, step {step}: " \
            f"{log[step]}"
    for step in (4, 5):
        assert log[step]["drift/reference_rejected"] == log[3]["drift/rejected"], f"Part 4, step {step}"
    soft = quoted_log("Part 4", "then (shortened as above")  # the glide: margins and the reference move from step 3
    assert all(soft[s]["rewards/margins"] == soft[s]["drift/reference_rejected"] == "0" for s in (1, 2)), soft
    assert all("0" not in (soft[s]["rewards/margins"], soft[s]["drift/reference_rejected"]) for s in range(3, 9)), soft
    text = next(t for t in SECTIONS if section_name(t) == "Part 4")
    assert "Compare 3 digits" in text, "Part 4 no longer says which of its digits are stable"


# the exercises' table, one `-k word` per function; and the invariants' command ("Predict, then check")
EXERCISES = re.findall(r"^\| `(\w+)` \| `\w+\.py` \| `python -m pytest -q (tests/\S+) -k (\w+)` \|$", LESSON, re.M)
INVARIANTS = re.findall(r"`python -m pytest -q (tests/test_train\.py) -k \"([^`\"]+)\"`", LESSON)


@pytest.mark.slow
def test_each_exercise_is_graded_by_one_word_that_selects_every_test_of_its_file_once():
    """pytest -k WORD selects a test whose name holds WORD (any case): each test of a grader file must be selected by
    exactly one exercise, so that no check of a function is left out of its grading command and none grades two."""
    files = sorted({path for _, path, _ in EXERCISES} | {path for path, _ in INVARIANTS})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", *files], capture_output=True,
                            text=True, cwd=ROOT)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert [f for f, _, _ in EXERCISES] == ["dpo_loss", "ipo_loss", "kto_loss", "update_reference", "should_update",
                                            "sequence_logps"], \
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


def test_the_windows_set_up_installs_what_make_setup_does():
    """The PowerShell lines cannot run here: they must install what the Makefile's set-up installs, pin for pin."""
    block = re.search(r"```powershell\n(.*?)```", LESSON, re.S).group(1)
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert "-r requirements.txt" in block, "LESSON.md's Windows set-up no longer installs requirements.txt"
    for pin in re.findall(r"\S+==\S+", block):
        assert pin in makefile or pin in open(os.path.join(ROOT, "requirements.txt")).read(), \
            f"LESSON.md's Windows set-up installs {pin}, which neither the Makefile nor requirements.txt pins"
    for pin in re.findall(r"--no-deps (\S+==\S+)", makefile):
        assert pin in block, f"the Makefile installs {pin}; LESSON.md's Windows set-up does not"
    for name in {n for _, c in COMMANDS for n in re.findall(r"\bmake \w+ .*?\b([A-Z_]+)=", c)}:
        assert re.search(rf"^{name} \?=", makefile, re.M), f"LESSON.md sets {name} for make; the Makefile has no {name}"


@pytest.mark.slow  # runs make
def test_make_setup_installs_again_only_when_the_requirements_change(tmp_path):
    """A fresh clone dates requirements.txt after an existing venv's stamp: the same content must not reinstall.
    PYTHON=false stands for the installer: were it run, make would fail."""
    venv = tmp_path / "venv"
    venv.mkdir()
    make = ["make", "-C", ROOT, f"VENV={venv}", "PYTHON=false", "setup"]
    assert subprocess.run(make, capture_output=True).returncode != 0, "make setup did not try to install a new venv"
    (venv / "requirements.txt").write_bytes(open(os.path.join(ROOT, "requirements.txt"), "rb").read())
    result = subprocess.run(make, capture_output=True, text=True)
    assert result.returncode == 0 and (venv / "ready").exists(), f"unchanged requirements reinstalled:\n{result.stderr}"
    os.utime(venv / "ready", (0, 0))  # requirements.txt changed since: a pull dates it after the stamp
    (venv / "requirements.txt").write_text("torch==0.0\n")
    assert subprocess.run(make, capture_output=True).returncode != 0, "changed requirements did not reinstall"


def test_the_class_run_shipped_in_lesson_is_the_run_part_4_quotes_with_its_updates_recorded():
    """A student who falls behind reads lesson/tr_dpo/ instead of their own run: its metrics.jsonl must be the quoted
    log (each quoted value as train.py prints it, 4 significant digits), its args.json the command's, and its record of
    reference updates the one the quote says happened (plot.py marks them from there)."""
    import json
    import plot
    part4 = LESSON.split("## Part 4.")[1].split("wrote out/lesson/tr_dpo/curves.png")[0]  # the class run and its log
    folder = os.path.join(ROOT, "lesson", "tr_dpo")
    args, records = plot.read_run(folder)
    command = next(line for line in part4.splitlines() if line.startswith("python train.py"))
    for flag, value in re.findall(r"--(\w+) (\S+)", command):
        if flag not in ("out_dir",):
            assert str(args[flag]) == value, (flag, args[flag], value)
    by_step = {r["step"]: r for r in records}
    quoted = re.findall(r"^    step (\d+) (loss .*)$", part4, re.M)
    assert len(quoted) == args["max_steps"]
    for step, line in quoted:
        for key, value in re.findall(r"([\w/]+) (-?[\d.e+-]+)(?= |$)", line):
            assert f"{by_step[int(step)][key]:.4g}" == value or by_step[int(step)][key] == float(value), (step, key)
    copies = [int(s) for s in re.findall(r"^    step (\d+): reference updated", part4, re.M)]
    assert plot.reference_updates(records) == [(s, 1.0) for s in copies] and copies
