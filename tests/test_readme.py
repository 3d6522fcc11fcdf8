"""The documents keep no hand-made copy of what the code holds: no file lengths (each change would edit them, and
merges conflict on them), no metric name that metrics.py does not declare (a renamed metric leaves none behind), and
no figure of the over-optimization study (a mean ± s.e., a p) that `python study.py` does not print from
results/study.json."""
import contextlib
import io
import json
import os
import re

import pytest

from conftest import ROOT
from metrics import METRICS

DOCUMENTS = sorted(f for f in os.listdir(ROOT) if f.endswith(".md"))


def test_the_readme_states_no_files_length():
    readme = open(os.path.join(ROOT, "README.md")).read()
    stated = re.findall(r"`\w+\.py`[^\n|]*\(\d+ lines\)|^\|.*`\w+\.py`.*\| [\d, ]+ \|$", readme, re.M)
    assert not stated, f"README.md states file lengths, which every change would have to edit: {stated}"


def test_every_test_file_is_in_designs_list_of_what_the_tests_check():
    design = open(os.path.join(ROOT, "DESIGN.md")).read()
    missing = [f for f in sorted(os.listdir(os.path.join(ROOT, "tests")))
               if f.startswith("test_") and f.endswith(".py") and f"`{f}`" not in design]
    assert not missing, f"DESIGN.md's list of what each test file checks leaves out {missing}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_metric_a_document_names_is_declared_in_metrics_py(document):
    groups = "|".join(sorted({k.split("/")[0] for k in METRICS if "/" in k}))  # rewards, logps, eval, drift, ...
    named = set(re.findall(rf"(?<![\w/.-])(?:{groups})/\w+(?:/\w+)*", open(os.path.join(ROOT, document)).read()))
    assert named <= set(METRICS), f"{document} names metrics that metrics.py does not declare: " \
                                  f"{sorted(named - set(METRICS))}"


# Where each document quotes the study's figures: from the first line that holds the start, up to the end.
STUDY_QUOTES = {"README.md": ("## Results", "## Tests"), "LESSON.md": ("results/study.png", "## Part 6"),
                "RESULTS.md": ("### Over-optimization study", "**What a seed varies.**")}
MEAN_SE = r"([+-]?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)"


@pytest.fixture(scope="module")
def study_figures(tmp_path_factory):
    """Every "mean ± s.e." that study.py prints from the committed records (its table and its paired differences), and
    every p beside a difference."""
    import study
    records = json.load(open(os.path.join(ROOT, "results", "study.json")))
    configs = list(dict.fromkeys([*study.CONFIGS, *(r["config"] for r in records)]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        study.report(records, configs, str(tmp_path_factory.mktemp("study") / "study.json"))
    return ([(float(m), float(se)) for m, se in re.findall(MEAN_SE, printed.getvalue())],
            re.findall(r"\(p (\d\.\d+)\)", printed.getvalue()))


def rounds_to(quoted, printed):
    """`quoted` (a string) is `printed` (a float, printed to 3 decimals) rounded to the quote's decimals."""
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(float(quoted) - printed) <= 0.5 * 10 ** -decimals + 0.0005 + 1e-9


@pytest.mark.parametrize("document", sorted(STUDY_QUOTES))
def test_every_figure_of_the_study_a_document_quotes_is_what_study_py_prints(document, study_figures):
    text = open(os.path.join(ROOT, document)).read()
    start, end = STUDY_QUOTES[document]
    assert start in text and end in text[text.index(start):], f"{document}: the study's part is marked by {start!r}"
    part = text[text.index(start):text.index(end, text.index(start))]
    quoted = re.findall(MEAN_SE, part)
    assert quoted, f"{document} quotes no figure of the study"
    figures, p_values = study_figures
    wrong = [f"{m} ± {se}" for m, se in quoted if not any(rounds_to(m, a) and rounds_to(se, b) for a, b in figures)]
    wrong += [f"p {p}" for p in re.findall(r"\bp\s+(\d\.\d+)", part) if p not in p_values]
    assert not wrong, f"{document} quotes figures of the study that `python study.py` does not print from " \
                      f"results/study.json (run it and copy them again): {wrong}"


# ---------------------------------------------------------------------------------------------------------------
# Where a reader looks: each thing the code declares (a method, a rule flag, a data field or hub set, a metric) is
# named in the README's place for it, read from the code, so that adding one without its documentation fails here.
README = open(os.path.join(ROOT, "README.md")).read()


def section(heading, text=README):
    """The README's text from the line `heading` to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    after = re.search(rf"^#{{1,{level}}} ", text[start + len(heading):], re.M)
    return text[start: start + len(heading) + (after.start() if after else len(text))]


def paragraph(start, text=README):
    """The README's paragraph that begins with `start`."""
    i = text.index(start)
    return text[i: text.find("\n\n", i)]


def names(word, text):
    """Whether `text` names `word` as a word of its own (any case; `dpo` in "DPO:", not in "dpo_norm")."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w])", text, re.I) is not None


def test_every_method_its_loss_and_its_own_flags_are_in_the_readmes_method_section():
    from losses import METHODS
    place = section("## The method in the code")
    missing = [f"{m} ({what})" for m, (loss, _, _, own) in METHODS.items()
               for what, ok in [("its name", names(m, place)), (f"losses.py:{loss.__name__}",
                                                                 f"`losses.py:{loss.__name__}`" in place),
                                *((f"--{flag}", f"--{flag}" in place) for flag in own)] if not ok]
    assert not missing, f"README.md's 'The method in the code' does not name: {missing}"


def test_every_method_that_reads_per_token_means_is_in_the_readmes_conventions():
    from losses import METHODS, reduction
    place = paragraph("Conventions that differ between implementations")
    means = [m for m in METHODS if reduction({"method": m}) == "mean"] + ["--ipo_average"]
    assert all(names(m, place) for m in means), f"README.md's conventions paragraph names the summed log-probs, " \
                                                f"not the per-token means of {means}"


def test_every_rule_flag_is_in_the_readmes_rule_section():
    from ref_update import Rule
    place = section("### One rule, three readings")
    assert not [f for f in Rule.FLAGS if f"--{f}" not in place], "a rule flag missing from the README's rule table"


def fields_read_from_a_row(code=None):
    """The fields sources.py's row functions read from a row (row["x"], row.get("x"), "x" in row): the schemas
    normalize() accepts, read from its code (`code`: instead of sources.py's)."""
    import ast
    tree = ast.parse(code or open(os.path.join(ROOT, "sources.py")).read())
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "row":
            fields.add(getattr(node.slice, "value", None))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and getattr(node.func.value, "id", None) == "row":
            fields.add(getattr(node.args[0], "value", None))
        elif isinstance(node, ast.Compare) and any(getattr(c, "id", None) == "row" for c in node.comparators):
            fields.add(getattr(node.left, "value", None))
    return {f for f in fields if isinstance(f, str)}


def test_every_data_set_and_every_field_a_row_may_hold_is_in_the_readmes_data_table():
    import sources
    place = section("## Data")
    fields = fields_read_from_a_row()
    assert {"prompt", "chosen", "rejected"} <= fields, fields  # the scan reads normalize()
    missing = [f for f in fields if f"`{f}`" not in place] + \
              [name for name in ["demo", *sources.HUB] if f"`{name}`" not in place]
    assert not missing, f"README.md's Data section does not name: {missing}"


def test_every_metric_is_named_in_the_readmes_metrics_paragraph():
    place = paragraph("**Metrics.**")
    missing = [k for k in METRICS if f"`{k}`" not in place and f"`{k.split('/')[0]}/*`" not in place]
    assert not missing, f"README.md's Metrics paragraph does not name: {missing} (by name, or as `group/*`)"


@pytest.mark.parametrize("change", ["a method", "a method on per-token means", "a rule flag", "a row schema",
                                    "a metric"])
def test_a_change_that_leaves_its_readme_place_out_fails_a_test(change, monkeypatch):
    """The research changes of shared/reading/MODIFY.md, each made in the code alone (the README as it is): a
    length-normalized DPO, a drift-triggered rule's flag, another lab's JSONL schema, a new metric."""
    import sys
    from losses import METHODS, dpo_loss
    from ref_update import Rule
    here = sys.modules[__name__]
    if change == "a method":
        monkeypatch.setitem(METHODS, "hinge", (dpo_loss, "paired", "sum", {}))
        test = test_every_method_its_loss_and_its_own_flags_are_in_the_readmes_method_section
    elif change == "a method on per-token means":
        monkeypatch.setitem(METHODS, "dpo_norm", (dpo_loss, "paired", "mean", {}))
        test = test_every_method_that_reads_per_token_means_is_in_the_readmes_conventions
    elif change == "a rule flag":
        monkeypatch.setattr(Rule, "FLAGS", (*Rule.FLAGS, "drift_threshold"))
        test = test_every_rule_flag_is_in_the_readmes_rule_section
    elif change == "a row schema":  # Intel/orca_dpo_pairs: system, question, chosen, rejected
        code = open(os.path.join(ROOT, "sources.py")).read() + "\n\ndef orca(row):\n    return row['question']\n"
        original = fields_read_from_a_row
        monkeypatch.setattr(here, "fields_read_from_a_row", lambda: original(code))
        test = test_every_data_set_and_every_field_a_row_may_hold_is_in_the_readmes_data_table
    else:
        monkeypatch.setitem(METRICS, "kl/policy_ref", ("KL(pi || ref) on the step's pairs", None, None))
        test = test_every_metric_is_named_in_the_readmes_metrics_paragraph
    with pytest.raises(AssertionError):
        test()
