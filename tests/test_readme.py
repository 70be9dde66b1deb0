"""Every command the README and the scripts' --help show parses with the flags the scripts have today."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("mine_masks", "pretrain", "linear_eval", "kmeans_eval", "finetune")


def shown_commands():
    """(where, script, argv) of each `python SCRIPT.py …` / `torchrun … SCRIPT.py …` line of a code block, continuations joined."""
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
