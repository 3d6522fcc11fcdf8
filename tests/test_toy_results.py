"""RESULTS.md's toy figures cannot drift from what toy.py prints: one run of the table RESULTS.md shows for
`python toy.py --width 2 --seed 2` (a setting the sweep includes, and LESSON.md's Part 2), recomputed and compared
line for line. The row is TR-DPO with alpha 0.6 every step: it runs the project's dpo_loss and update_reference, and
its figures are the same on CPUs whose float64 kernels differ (ATEN_CPU_CAPABILITY=default and AVX2 give it alike;
the TR-DPO alpha 0.1 row does not, RESULTS.md says why). One run of 1000 steps: a few seconds, not the sweep."""
import os
import re

import torch

from conftest import ROOT
from toy import make_data, table_row, train

RESULTS = open(os.path.join(ROOT, "RESULTS.md")).read()


def test_results_toy_table_row_is_what_toy_py_prints_today():
    block = RESULTS[RESULTS.index("python toy.py --width 2 --seed 2"):]
    shown = re.search(r"^    (tr_dpo +0\.6 +1 .*)$", block, re.M)
    assert shown, "RESULTS.md shows no tr_dpo alpha 0.6 row under `python toy.py --width 2 --seed 2`"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as toy.py: on 84 numbers, thread start-up costs more than the math
    try:
        sft, chosen, rejected = make_data(seed=2, width=2)
        history = train("tr_dpo", 0.6, 1, sft, chosen, rejected, steps=1000, lr=0.01, beta=0.1)[2]
    finally:
        torch.set_num_threads(threads)
    printed = table_row("tr_dpo", 0.6, 1, history)
    assert printed == shown.group(1), \
        f"RESULTS.md, toy.py --width 2 --seed 2, TR-DPO alpha 0.6 every step:\n  shown  {shown.group(1)}\n  " \
        f"printed {printed}\n(regenerate the section with its command)"
