"""The README's file table states each file's length: kept equal to the files, so the reading path stays honest."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(name):
    return sum(1 for _ in open(os.path.join(ROOT, name)))


def test_the_readme_states_each_files_length_as_it_is():
    readme = open(os.path.join(ROOT, "README.md")).read()
    stated = re.findall(r"^\| ([^|]+) \| [^|]+ \| ([\d, ]+) \|$", readme, re.M)  # | `a.py`, `b.py` | ... | 1, 2 |
    stated += re.findall(r"^\d\. (`\w+\.py`) \((\d+) lines\)", readme, re.M)  # 1. `losses.py` (65 lines): ...
    assert len(stated) >= 10
    for files, counts in stated:
        names = re.findall(r"`(\w+\.py)`", files)
        assert [lines(n) for n in names] == [int(c) for c in counts.split(",")], f"README: {files} {counts}"
