"""ref_update.Rule owns its flags and everything train.py, checkpoint.py, plot.py and evaluate.py read of it: every
rule its flags can ask for is checked here, generated from Rule.add_flags, so a new rule flag is covered as added."""
import argparse
import itertools

import pytest

import flags
from ref_update import Rule

SAMPLES = ("0", "0.5", "1", "3")  # in-domain values of a numeric rule flag are drawn from these


def rule_parser():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--method", default="tr_dpo", choices=["dpo", "tr_dpo"])
    Rule.add_flags(p)
    return p


def rule_flags():
    return [a for a in rule_parser()._actions if a.option_strings and a.dest not in ("help", "method")]


def accepted(action, value):
    try:
        action.type(value)
        return True
    except argparse.ArgumentTypeError:
        return False


def every_rule():
    """(command line, Rule over an 8-step run) for every combination of every rule flag's values: its choices, or
    the samples its domain accepts; each flag also left out."""
    options = [[[]] + [[a.option_strings[0], v] for v in (a.choices or [s for s in SAMPLES if accepted(a, s)])]
               for a in rule_flags()]
    p = rule_parser()
    return [(argv, Rule.of_args(p, p.parse_args(argv)).over(8))
            for argv in (sum(combo, []) for combo in itertools.product(*options))]


def test_rule_flags_are_the_flags_it_adds_and_each_declares_its_domain():
    """Rule.FLAGS is what args.json keeps, of_run reads back, and the vanilla methods refuse: every flag add_flags
    declares must be in it, with a domain (flags.py)."""
    assert [a.dest for a in rule_flags()] == list(Rule.FLAGS)
    assert all(isinstance(a.type, flags.Domain) or a.choices for a in rule_flags())


@pytest.mark.parametrize("argv, rule", every_rule(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_a_rule_mixes_exactly_when_an_update_weighs_the_policy_less_than_1(argv, rule):
    """`mixes` chooses the reference's dtype (train.py: a mix needs fp32, a bf16 lerp stalls; only a rule that always
    copies may keep a bf16 reference under FSDP): it must be true whenever some update of the run is a mix."""
    weights = {rule.weight(step) for step in range(1, rule.horizon + 1) if rule.due(step)}
    assert all(0 <= w <= 1 for w in weights), (argv, weights)
    assert rule.mixes == any(w != 1 for w in weights) or (not weights and not rule.moves()[0]), (argv, weights)


@pytest.mark.parametrize("argv, rule", every_rule(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_the_rule_a_run_keeps_is_the_rule_it_ran(argv, rule):
    """train.py writes rule.in_force() and max_steps into args.json; Rule.of_run reads the rule back from it."""
    run = {"method": "tr_dpo", **rule.in_force(), "max_steps": rule.horizon}
    assert Rule.of_run(run) == rule
    assert str(rule)


def test_every_value_of_every_rule_flag_reaches_the_rule():
    """A rule flag that add_flags declares but of_args does not pass on would be a silent no-op: each of its values
    must change the rule of some command line (the same line without it, or with another value)."""
    p = rule_parser()
    rules = {tuple(argv): rule for argv, rule in every_rule()}
    for a in rule_flags():
        flag = a.option_strings[0]
        values = a.choices or [s for s in SAMPLES if accepted(a, s)]
        for value in (v for v in values if v != a.default):  # (leaving a flag at its default changes nothing)
            with_it = [(argv, rule) for argv, rule in rules.items()
                       if flag in argv and argv[argv.index(flag) + 1] == value]
            assert any(rule != Rule.of_args(p, p.parse_args(drop(argv, flag))).over(8) for argv, rule in with_it), \
                f"{flag} {value} changes no rule"


def drop(argv, flag):
    i = argv.index(flag)
    return [*argv[:i], *argv[i + 2:]]


def test_the_rules_flags_are_refused_for_a_method_whose_reference_never_moves():
    p = rule_parser()
    for a in rule_flags():
        value = a.choices[-1] if a.choices else next(s for s in SAMPLES if accepted(a, s))
        with pytest.raises(SystemExit):
            Rule.of_args(p, p.parse_args(["--method", "dpo", a.option_strings[0], value]))


def applied(rule, steps=8):
    """What a run of `rule` records of its updates, step by step as train.py calls Rule.apply, and the weights its
    reference took ([[step, weight], ...], and the reference parameter after each step): a one-parameter policy
    whose value is the step number, a reference starting at 0."""
    import torch
    policy, reference = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(reference.weight)
    record, values = {}, []
    for step in range(1, steps + 1):
        torch.nn.init.constant_(policy.weight, float(step))
        rule.apply(step, reference, policy, record, log=lambda message: None)
        values.append(reference.weight.item())
    return record.get("ref_updates/applied", []), values


@pytest.mark.parametrize("argv, rule", every_rule(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_the_record_of_an_update_is_the_update_the_reference_took(argv, rule):
    """Each [step, weight] recorded is the step and the weight of a mix the reference did take, and no other
    update happened: replaying the record on the same policy gives the same reference."""
    record, values = applied(rule)
    replayed, ref = [], 0.0
    for step in range(1, 9):
        for s, w in (u for u in record if u[0] == step):
            ref = w * step + (1 - w) * ref  # theta_ref <- alpha * theta + (1 - alpha) * theta_ref
        replayed.append(ref)
    assert replayed == pytest.approx(values, abs=1e-6), (argv, record)


def test_rules_that_differ_are_told_apart_in_the_start_up_line_and_the_legends():
    """str(rule) starts every run; ref_update.recorded names the run in plot.py's and evaluate.py's legends from the
    updates it recorded: two runs whose references moved differently must not read the same."""
    from ref_update import recorded
    rules = {rule for _, rule in every_rule()}
    assert len({str(rule) for rule in rules}) == len(rules)
    histories = {tuple(map(tuple, applied(rule)[0])) for rule in rules}
    moved = {tuple(u for u in h if u[1] > 0) for h in histories}  # alpha 0: recorded, moves nothing
    assert len({recorded(h, 8) for h in moved}) == len(moved)
