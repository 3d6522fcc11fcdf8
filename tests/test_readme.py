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
