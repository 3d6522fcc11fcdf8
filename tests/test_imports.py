"""The files' dependencies run one way: no file imports another that imports it back, directly or through others,
so each file imports alone and a reader can start from the leaves (model.py, losses.py)."""
import ast
import os
import subprocess
import sys

from conftest import ROOT


def project_imports(path, modules):
    """The project modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found |= {n.split(".")[0] for n in names} & modules
    return found


def test_no_file_imports_one_that_imports_it_back():
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {m: project_imports(os.path.join(ROOT, f"{m}.py"), modules) - {m} for m in modules}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph[start])
    circles = sorted(m for m in modules if reaches(m, m))
    assert not circles, {m: sorted(graph[m]) for m in circles}
    assert graph["model"] <= {"guards", "locate"}, "no data or training in model.py"
    assert graph["losses"] <= {"flags"} and graph["flags"] == set(), "losses.py: the math, and its flags' domains"


def test_the_lessons_scripts_start_without_transformers():
    """toy.py (Part 2) and plot.py need torch alone: importing transformers would cost each start 1.3 s (it came in
    through ref_update.py -> fsdp.py -> model.py)."""
    code = "import sys, toy, plot; print(sorted({'transformers', 'datasets', 'matplotlib'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
