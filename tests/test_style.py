"""The project's rules for its code, checked: lines of at most 120 characters everywhere, and in the five scripts and
common.py no function over 120 lines or 8 parameters (small dataclasses carry the rest)."""
import ast

import pytest

from conftest import ROOT, SCRIPTS

SOURCES = sorted(p for p in ROOT.glob("**/*.py") if ".git" not in p.parts and "demo_out" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_lines_fit_in_120_characters(path):
    long = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"{path.name}: lines {long} are over 120 characters"


@pytest.mark.parametrize("name", SCRIPTS + ("common",))
def test_functions_stay_short_and_take_few_parameters(name):
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.FunctionDef):
            a = node.args
            params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            assert node.end_lineno - node.lineno + 1 <= 120, f"{name}.{node.name}: over 120 lines"
            assert len(params) <= 8, f"{name}.{node.name}: {len(params)} parameters"
