"""The mutation list of ``tools/mutate.py`` cannot rot silently: every
mutation still applies to the code as it is (its original text is found
exactly once in its file, its tests exist).  Running the mutants is not
part of the suite: ``tools/mutate.py`` does it (``docs/development.md``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def load_tool():
    """tools/mutate.py (a script, not a package module)."""
    name = "mailguard_tools_mutate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "mutate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_every_mutation_still_applies():
    mutate = load_tool()
    assert mutate.stale() == []
    assert len(mutate.MUTATIONS) >= 40


def test_a_stale_mutation_is_reported(tmp_path):
    """The check above can fail: a text that is gone, or found twice."""
    mutate = load_tool()
    (tmp_path / "m.py").write_text("a = 1\na = 1\nb = 2\n")
    (tmp_path / "t.py").write_text("")
    cases = [mutate.Mutation("gone", "m.py", "c = 3", "c = 4", ("t.py",)),
             mutate.Mutation("twice", "m.py", "a = 1", "a = 2", ("t.py",)),
             mutate.Mutation("fine", "m.py", "b = 2", "b = 3", ("t.py",)),
             mutate.Mutation("no-tests", "m.py", "b = 2", "b = 4", ("missing.py",))]
    assert mutate.stale(cases, tmp_path) == [
        "gone: the original text is found 0 times in m.py, not once",
        "twice: the original text is found 2 times in m.py, not once",
        "no-tests: missing.py does not exist",
    ]


def test_the_core_areas_are_covered():
    """Relay, VRFY, greeting, framing, AUTH, the durable commit and the
    queue each have mutants (the issue's core list)."""
    files = {m.file for m in load_tool().MUTATIONS}
    assert {"mailguard/policy/decide.py", "mailguard/policy/greeting.py", "mailguard/smtpd/framing.py",
            "mailguard/smtpd/extensions.py", "mailguard/store/maildir.py", "mailguard/store/durable.py",
            "mailguard/store/queue.py", "mailguard/store/relayclient.py"} <= files
