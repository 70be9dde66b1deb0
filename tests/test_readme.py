"""What the README and the scripts' --help show is true of the code: every command parses with the flags the scripts
have today, and the paper → code table names definitions, flags and files that exist."""
import importlib
import re
import shlex

import pytest

from conftest import ROOT, SCRIPTS, help_text


def shown_commands():
    """(where, script, argv) of each `python SCRIPT.py …` / `torchrun … SCRIPT.py …` line of the README's code blocks
    and the scripts' docstrings, continuations joined."""
    texts = {"README.md": "\n".join((ROOT / "README.md").read_text().split("```")[1::2])}  # its code blocks
    texts.update({f"{s}.py --help": importlib.import_module(s).__doc__ for s in SCRIPTS})
    found = []
    for where, text in texts.items():
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            m = re.search(r"\b(?:python3?|torchrun)\b.*?\b(%s)\.py\b([^`|]*)" % "|".join(SCRIPTS), line)
            if m and "..." not in m.group(2) and "…" not in m.group(2):
                found.append((where, m.group(1), shlex.split(m.group(2), comments=True)))
    return found


COMMANDS = shown_commands()


def test_the_commands_are_found():
    assert {s for _, s, _ in COMMANDS} == set(SCRIPTS) and len(COMMANDS) >= 25


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{s}:{i}" for i, (w, s, _) in enumerate(COMMANDS)])
def test_shown_command_parses(where, script, argv):
    try:
        importlib.import_module(script).get_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{script}.py {shlex.join(argv)}` does not parse (exit {e.code})")


def test_paper_to_code_map_points_at_what_exists():
    """Each name in the README's paper → code table is defined where it says, each flag and value is the script's."""
    section = (ROOT / "README.md").read_text().split("## From the paper to the code")[1].split("\n## ")[0]
    checked = 0
    for row in [r for r in section.splitlines() if r.startswith("| ") and "`" in r.split("|")[2]]:
        module = owner = None
        for token in re.findall(r"`([^`]+)`", row.split("|")[2]):
            if "/" in token or token.endswith(".png"):  # a file in the tree, or one a script writes
                assert token.endswith(".png") or (ROOT / token).exists(), token
                continue
            words = token.split()
            if words[0].endswith(".py"):
                module, owner, words = importlib.import_module(words[0][:-3]), None, words[1:]
            for w in words:
                head, *rest = w.split(".")
                if head in SCRIPTS + ("common",) and rest:  # module.name[.attr]: .attr tokens after it are the class's
                    module = owner = importlib.import_module(head)
                    for name in rest:
                        assert hasattr(owner, name), f"{w}: {owner.__name__} has no {name}"
                        owner = getattr(owner, name) if isinstance(getattr(owner, name), type) else owner
                elif w.startswith("."):
                    assert hasattr(owner, w[1:]), f"{owner.__name__} has no {w}"
                elif not w.startswith("--") and hasattr(module, w):
                    owner = getattr(module, w)
                else:  # a flag, or a value of one
                    assert re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(w), help_text(module.__name__)), \
                        f"{module.__name__}.py --help shows no {w}"
                checked += 1
    assert checked >= 30


def test_differences_table_names_flags_that_exist():
    """Each flag in the last column of the README's differences table is one of its script's (the one the cell
    names, else any), whole."""
    section = (ROOT / "README.md").read_text().split("## Differences")[1].split("\n## ")[0]
    helps = {s: help_text(s) for s in SCRIPTS}
    rows = [r.split("|")[-2] for r in section.splitlines() if r.startswith("| ") and "--" in r.split("|")[-2]]
    for cell in rows:
        named = [s for s in SCRIPTS if f"{s}.py" in cell] or list(SCRIPTS)
        for flag in re.findall(r"--[a-z][\w-]*", cell):
            assert any(re.search(r"(?<![\w-])%s(?![\w-])" % flag, helps[s]) for s in named), (flag, cell)
    assert len(rows) >= 20
