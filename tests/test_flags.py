"""Every flag of every entry point declares what it may hold beside itself (flags.py), and its boundaries give a
completed run or one sentence naming the flag: never a traceback, never a run that silently trains nothing.

The flags are read from each entry point's own parser (caught where it parses), so a flag added anywhere is covered,
and one added without a domain fails the first test. The probes (0, a negative, an absurd value, the wrong type) are
the domain's own (flags.Domain.probes)."""
import argparse
import contextlib
import functools
import glob
import io
import os
import re
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

import flags
import model
from conftest import ROOT, train_py
from losses import METHODS
from test_train import TINY_RUN

ENTRY_POINTS = {  # script: the arguments it requires, as a run would give them
    "train.py": [], "evaluate.py": ["CKPT", "--baseline", "SFT"], "data.py": ["demo"], "plot.py": ["RUN"],
    "toy.py": [], "bench.py": [], "study.py": [], "demo/make_data.py": [],
}


class Parsed(Exception):
    """Raised where an entry point parses its arguments: nothing after that runs."""


@functools.cache
def parser_of(script):
    """The argparse parser `script` builds, caught at its parse_args."""
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise Parsed
    saved = argparse.ArgumentParser.parse_args, sys.argv, sys.excepthook, list(sys.path)
    argparse.ArgumentParser.parse_args, sys.argv = catch, [script, *ENTRY_POINTS[script]]
    sys.path.insert(0, os.path.dirname(os.path.join(ROOT, script)))  # as `python script` puts its folder first
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Parsed):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        argparse.ArgumentParser.parse_args, sys.argv, sys.excepthook, sys.path[:] = saved
    assert caught, f"{script} parsed no arguments"
    return caught[0]


def flags_of(script):
    return [a for a in parser_of(script)._actions if not isinstance(a, argparse._HelpAction)]


def name(action):
    return action.option_strings[0] if action.option_strings else action.dest


def test_every_script_with_flags_is_an_entry_point_here():
    """A new script's flags are covered only if it is listed above: one that parses arguments and is not fails."""
    scripts = {os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "*.py")) +
               glob.glob(os.path.join(ROOT, "demo", "*.py")) if "ArgumentParser(" in open(path).read()}
    assert scripts == set(ENTRY_POINTS), f"ENTRY_POINTS (with its required arguments): {scripts ^ set(ENTRY_POINTS)}"


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_flag_declares_its_domain_beside_it(script):
    """A flag is a Domain (flags.py), a choice, or a switch: nothing else passes, so a new flag must say what it may
    hold (and what 0 means) where it is declared."""
    undeclared = [name(a) for a in flags_of(script)
                  if not (isinstance(a.type, flags.Domain) or a.choices or a.nargs == 0)]
    assert not undeclared, f"{script}: flags without a declared domain (flags.py): {undeclared}"


def parse(parser, argv):
    """(status, stderr) of parser.parse_args(argv): 0 where argparse accepts it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
            return 0, ""
        except SystemExit as e:
            return e.code, err.getvalue()


def probes(script):
    """(flag, value) for every probe of every flag's domain."""
    return [(name(a), value) for a in flags_of(script) if isinstance(a.type, flags.Domain) for value in a.type.probes
            if a.option_strings]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_a_value_outside_a_flags_domain_is_refused_in_one_sentence_naming_the_flag(script):
    """argparse refuses it before anything loads: `error: argument --tau: 0 must be at least 1`. The values it
    accepts are run by the test below (train.py)."""
    parser = parser_of(script)
    for flag, value in probes(script):
        status, stderr = parse(parser, [*ENTRY_POINTS[script], flag, value])
        if status:
            assert status == 2 and f"error: argument {flag}: " in stderr and "Traceback" not in stderr, stderr
            assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr
    status, stderr = parse(parser, ENTRY_POINTS[script])
    assert status == 0, stderr


def test_the_probes_cover_zero_a_negative_an_absurd_value_and_the_wrong_type():
    assert flags.at_least(1).probes == ("0", "-1", "1000000000", str(2**64), "x")
    assert flags.at_least(1)("3") == 3 and flags.at_least(0.0, zero="no clipping")("0") == 0.0
    for domain, value, message in [(flags.at_least(1), "0", "0 must be at least 1"),
                                   (flags.at_least(1), "1.5", "'1.5' is not an integer"),
                                   (flags.positive(), "nan", "nan must be positive"),
                                   (flags.in_range(0.0, 0.5, high_open=True), "0.5", "0.5 must be in [0, 0.5)"),
                                   (flags.in_range(0.0, 1.0), "x", "'x' is not a number")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            domain(value)


def test_a_seed_is_one_every_generator_takes_through_every_formula_that_derives_one():
    """A date-time seed passed argparse and overflowed when the first batch was ordered (data.Batches seeds
    seed * 1_000_003 + epoch), after loading and tokenizing. The domain's largest value runs through each formula."""
    from data import Batches
    domain = flags.random_seed()
    largest = domain(str(2**32 - 1))
    for absurd in ("20261208011500", str(2**64)):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer from 0 to 2"):
            domain(absurd)
    examples = [{"row": i, "prompt": torch.tensor([i])} for i in range(8)]
    assert sorted(pair["row"] for pair, _ in Batches(examples, 4, 4, seed=largest)(9)[0])
    torch.manual_seed(2 * largest + 1)  # evaluate.py's (study.py's: --seed 2s, the baseline's 2s + 1)
    torch.Generator().manual_seed(largest * 1_000_003 + 10**6)


def test_a_max_length_beyond_the_positions_a_model_learned_is_refused_naming_the_flag(tmp_path):
    """GPT-2 learns a vector per position: a longer sequence is an IndexError in the first forward (a device-side
    assert on CUDA), after loading and tokenizing. Refused once the config is read; rotary models take any length."""
    gpt2 = GPT2Config(vocab_size=64, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    gpt2.to_json_file(tmp_path / "gpt2.json")
    net = AutoModelForCausalLM.from_config(gpt2)
    net(input_ids=torch.zeros(1, 16, dtype=torch.long))  # the limit, found by running it
    with pytest.raises(IndexError):
        net(input_ids=torch.zeros(1, 17, dtype=torch.long))
    parser = parser_of("train.py")
    for model_, length, refused in [(tmp_path / "gpt2.json", 16, False), (tmp_path / "gpt2.json", 17, True),
                                    (TINY_RUN[1], 10**6, False)]:
        said, stderr = True, io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.suppress(SystemExit):
            model.check_model_flags(parser, parser.parse_args(["--model", str(model_), "--max_length", str(length)]))
            said = False  # passed
        assert said == refused, (model_, length, stderr.getvalue())
        assert not refused or "error: --max_length 17 is beyond the 16 positions" in stderr.getvalue()


def accepted_train_probes():
    """Every probe of train.py that argparse accepts: each must give a completed run. The run's length is bounded by
    --max_steps 1, so --max_steps' own absurd values are left out (a run of 10^9 steps, as asked)."""
    parser = parser_of("train.py")
    method_of = {f"--{flag}": method for method, (*_, own) in METHODS.items() for flag in own}
    cases = []
    for flag, value in probes("train.py"):
        if flag == "--max_steps" and value in ("1000000000", str(2**64)) or flag in ("--model", "--dataset", "--out_dir"):
            continue
        if parse(parser, [flag, value])[0] == 0 and parser.parse_args([flag, value]) != parser.parse_args([]):
            cases.append((flag, value, method_of.get(flag)))  # (a default's value is every other run's)
    return cases


def batches(cases):
    """The cases in few runs (a run is ~5 s): one method and one probe value per run, so that a flag at 0 that
    silently stops training is not hidden by another flag's absurd value; --weight_decay apart, as it moves the
    weights without a gradient and would hide any flag that stops training."""
    runs = {}
    for flag, value, method in cases:
        runs.setdefault((method, value, flag == "--weight_decay"), []).append((flag, value, method))
    return list(runs.values())


@pytest.fixture(scope="module")
def gpt2_config(tmp_path_factory):
    """A tiny GPT-2 of 40 learned positions: fewer than the longest of tests/pairs.jsonl's pairs (43 tokens)."""
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.json"
    GPT2Config(vocab_size=49152, n_embd=32, n_layer=2, n_head=4, n_positions=40).to_json_file(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("cases", batches(accepted_train_probes()),
                         ids=lambda cases: " ".join(f"{flag}={value}" for flag, value, _ in cases))
def test_every_value_train_py_accepts_completes_a_run_that_trains_or_says_why_not(cases, gpt2_config, tmp_path):
    """One step on a tiny model that learned its positions (GPT-2: a value that makes a sequence longer is an
    IndexError in the first forward unless refused), with one value of each of several flags (an integer beyond 64
    bits among them: --seed once overflowed). The run completes with its checkpoint,
    and its policy moved away from the SFT model, or a warning says why it cannot (`--warmup_steps` longer than the
    run: the lr stays 0), or the run stops at start-up with one sentence naming a flag. A flag answered by its
    sentence or warning leaves the run, and the others run again without it. (`--max_grad_norm 0` once scaled every
    gradient to 0: a run that trained nothing and said nothing.)"""
    method = cases[0][2]
    while cases:
        out_dir = tmp_path / str(len(cases))
        flags_ = [*TINY_RUN, "--model", gpt2_config, "--max_length", "40", "--max_prompt_length", "32", "--max_steps",
                  "1", "--out_dir", out_dir, *(["--method", method] if method else []),
                  *(word for flag, value, _ in cases for word in (flag, value))]
        status, log = train_py(*flags_)
        assert "Traceback" not in log, log[-3000:]
        if status:
            errors = [line for line in log.splitlines() if "error:" in line]
            named = sorted((errors[0].index(c[0]), c) for c in cases if errors and c[0] in errors[0])
            assert status in (1, 2) and len(errors) == 1 and named, log[-3000:]
            cases = [c for c in cases if c != named[0][1]]  # the flag named first: the one the sentence is about
            continue
        seed = int(dict((f, v) for f, v, _ in cases).get("--seed", 0))
        sft = model.load_model(gpt2_config, seed=seed).state_dict()
        policy = load_file(os.path.join(out_dir, "step_000001", "policy", "model.safetensors"))
        if any(not torch.equal(policy[k], sft[k].float()) for k in policy if k in sft):
            return
        warned = [c for c in cases if f"warning: {c[0]}" in log]
        assert warned, f"{[f'{f} {v}' for f, v, _ in cases]}: the run trained nothing, said nothing\n{log[-2000:]}"
        cases = [c for c in cases if c not in warned]
