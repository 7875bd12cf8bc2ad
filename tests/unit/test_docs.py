"""The documentation stays inside the repository and true to the code.

A fresh clone must carry everything its README needs.  So every link in
README.md, CHANGELOG.md, docs/, bench/ and contrib/ must resolve to a file
here (and to a heading, when it names one); none may leave the repository
(``../`` above the root, ``file:``, absolute paths); http(s) links to RFCs
and public documentation are allowed.  Every setting name the documents
mention must be one mailguard reads, and the reference's settings tables
are checked against ``SCALARS`` both ways, defaults included, so adding a
setting without documenting it fails here.  The option table and the
reply table of the reference are held to ``tap.Options`` and
``mailguard.replies`` the same way.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import MISSING, fields
from pathlib import Path
from urllib.parse import unquote

import pytest

from mailguard import replies
from mailguard.config.settings import SCALARS, Configuration
from mailguard.tap import Options

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"


def documents(root: Path = ROOT) -> list[Path]:
    found = [root / "README.md", root / "CHANGELOG.md"]
    for folder in ("docs", "bench", "contrib"):
        found += sorted(p for p in (root / folder).rglob("*.md")
                        if "results" not in p.relative_to(root).parts)
    return found


# --- Markdown, as much of it as links need ---------------------------------

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^()\s]+)"
                     r"""(?:\s+(?:"[^"]*"|'[^']*'))?\s*\)""")
_REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
_AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*)>")
_HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> str:
    """C{text} without fenced code blocks and code spans (same line count):
    brackets in code are not links."""
    out, fenced = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), "\n".join(out))


def links(text: str) -> list[str]:
    plain = prose(text)
    found = [m.group(1) for m in _INLINE.finditer(plain)]
    found += [m.group(1) for m in _REFDEF.finditer(plain)]
    found += [m.group(1) for m in _AUTOLINK.finditer(plain)]
    found += [m.group(1) for m in _HTML.finditer(plain)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, without
    punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text).split("\n"):
        m = _HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    out.update(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", text))
    return out


def link_problems(root: Path, doc: Path, text: str) -> list[str]:
    """What is wrong with each link of C{doc} (whose content is C{text})."""
    problems = []
    here = doc.parent.relative_to(root)
    for target in links(text):
        where = f"{doc.relative_to(root)}: link {target!r}"
        if _SCHEME.match(target) or target.startswith("//"):
            if target.split(":", 1)[0].lower() not in ("http", "https"):
                problems.append(f"{where} leaves the repository (only http(s) links may)")
            continue
        if target.startswith("/"):
            problems.append(f"{where} is absolute: write it relative to this file")
            continue
        path, _, fragment = target.partition("#")
        if not path:  # a heading of this document
            rel, content = str(doc.relative_to(root)), text
        else:
            rel = os.path.normpath(here / unquote(path))
            if rel == ".." or rel.startswith(".." + os.sep):
                problems.append(f"{where} leaves the repository")
                continue
            if not (root / rel).exists():
                problems.append(f"{where}: no such file {rel}")
                continue
            content = None
        if fragment and rel.endswith(".md"):
            if content is None:
                content = (root / rel).read_text(encoding="utf-8")
            if unquote(fragment) not in anchors(content):
                problems.append(f"{where}: {rel} has no heading for #{fragment}")
    return problems


def test_the_documents_are_all_found():
    names = {str(p.relative_to(ROOT)) for p in documents()}
    assert {"README.md", "CHANGELOG.md", "docs/reference.md", "docs/configuration.md",
            "bench/README.md", "bench/performance.md"} <= names
    assert all(p.exists() for p in documents())
    assert not (ROOT / "docs" / "performance.md").exists()  # the lab notes live in bench/


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc):
    assert link_problems(ROOT, doc, doc.read_text(encoding="utf-8")) == []


def test_the_readme_and_the_configuration_guide_point_to_the_reference():
    assert "docs/reference.md" in links((ROOT / "README.md").read_text(encoding="utf-8"))
    guide = links((ROOT / "docs" / "configuration.md").read_text(encoding="utf-8"))
    assert any(t.startswith("reference.md#") for t in guide)


@pytest.mark.parametrize("target,complaint", [
    ("../../shared/SPEC.md", "leaves the repository"),
    ("../../../etc/passwd", "leaves the repository"),
    ("file:///etc/passwd", "leaves the repository"),
    ("ftp://example.org/x", "leaves the repository"),
    ("/etc/passwd", "is absolute"),
    ("missing.md", "no such file"),
    ("reference.md#no-such-heading", "has no heading"),
    ("#not-here-either", "has no heading"),
])
def test_the_link_checker_catches(target, complaint):
    text = f"# Title\n\nSee [this]({target}).\n"
    problems = link_problems(ROOT, ROOT / "docs" / "new.md", text)
    assert len(problems) == 1 and complaint in problems[0], problems


@pytest.mark.parametrize("text", [
    "[RFC 5321](https://www.rfc-editor.org/rfc/rfc5321)",
    "[settings](reference.md#settings)",
    "[back](../README.md#two-commands)",
    "[here](#title)",
    "<https://keepachangelog.com/en/1.1.0/>",
    "`[not](a-link.md)` and\n```\n[nor](this.md)\n```",
])
def test_the_link_checker_accepts(text):
    assert link_problems(ROOT, ROOT / "docs" / "new.md", f"# Title\n\n{text}\n") == []


@pytest.mark.parametrize("heading,anchor", [
    ("Differences from the contract", "differences-from-the-contract"),
    ("HOST:PORT", "hostport"),
    ("Without --relay-host", "without---relay-host"),
    ("python -m mailguard check", "python--m-mailguard-check"),
    ("The teaser (`SmtpGreetingTeaser=1`)", "the-teaser-smtpgreetingteaser1"),
])
def test_anchors_are_githubs(heading, anchor):
    assert slug(heading) == anchor


# --- the reference's tables ---------------------------------------------------

def section(text: str, title: str) -> str:
    """The body of the section headed C{title}, up to the next heading of
    the same or a higher level."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if m and m.group(2) == title:
            level, body = len(m.group(1)), []
            for later in lines[i + 1:]:
                n = _HEADING.match(later)
                if n and len(n.group(1)) <= level:
                    break
                body.append(later)
            return "\n".join(body)
    raise AssertionError(f"no section {title!r}")


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of C{text}, as rows keyed by the header cells."""
    found, header, rows = [], None, []
    for line in text.split("\n") + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if header is None:
                header = cells
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(dict(zip(header, cells)))
        elif header is not None:
            found.append(rows)
            header, rows = None, []
    return found


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def settings_rows() -> list[tuple[str, dict[str, str]]]:
    """(subsection, row) for every row of the tables under "Settings"."""
    out, text = [], section(reference(), "Settings")
    for part in re.split(r"^### ", text, flags=re.M)[1:]:
        title = part.split("\n", 1)[0].strip()
        for table in tables(part):
            out += [(title, row) for row in table]
    return out


def code_defaults() -> dict[str, object]:
    out = {}
    for f in fields(Configuration):
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()
    return out


def test_the_reference_documents_every_setting_once_and_no_other():
    documented = [ticked(row["name"])[0] for _, row in settings_rows()]
    read = [s.name for s in SCALARS]
    assert sorted(set(read) - set(documented)) == [], "read by mailguard, not in docs/reference.md"
    assert sorted(set(documented) - set(read)) == [], "in docs/reference.md, not read by mailguard"
    assert len(documented) == len(set(documented)), "a setting described twice"


def test_the_kerio_table_holds_exactly_the_kerio_names():
    kerio = {ticked(row["name"])[0] for title, row in settings_rows() if title == "Kerio names"}
    assert kerio == {s.name for s in SCALARS if s.kerio}


# Defaults worked out when the configuration is loaded, with the words the
# reference must use for them.
COMPUTED_DEFAULTS = {"InternetHostname": "FQDN"}


def test_the_documented_defaults_are_the_code_defaults():
    rows = {ticked(row["name"])[0]: row for _, row in settings_rows()}
    defaults = code_defaults()
    wrong = []
    for scalar in SCALARS:
        cell = rows[scalar.name]["default"]
        if scalar.name in COMPUTED_DEFAULTS:
            assert COMPUTED_DEFAULTS[scalar.name] in cell, scalar.name
            continue
        literal = re.match(r"`([^`]*)`", cell)
        if literal is None and not cell.startswith("empty"):
            wrong.append(f"{scalar.name}: default {cell!r} is neither `value` nor 'empty'")
            continue
        value = scalar.parse(literal.group(1) if literal else "")
        if value != defaults[scalar.attr]:
            wrong.append(f"{scalar.name}: documented {value!r}, code {defaults[scalar.attr]!r}")
    assert wrong == []


def test_settings_are_described_only_in_the_reference():
    names = {s.name for s in SCALARS}
    for doc in documents():
        if doc == REFERENCE:
            continue
        for table in tables(doc.read_text(encoding="utf-8")):
            for row in table:
                first = re.fullmatch(r"`(\w+)`", next(iter(row.values()), ""))
                assert not (first and first.group(1) in names), \
                    f"{doc.relative_to(ROOT)} describes {first.group(1)}: link to docs/reference.md instead"


def test_every_twistd_option_is_documented_and_no_other():
    rows = tables(section(reference(), "twistd mailguard"))[0]
    documented = {m for row in rows for m in re.findall(r"`--([a-z-]+)", row["option"])}
    options = {o[0] for o in Options.optParameters} | {o[0] for o in getattr(Options, "optFlags", [])}
    # Repeatable options and --version are methods (opt_smtp...).
    options |= {name[len("opt_"):].replace("_", "-") for name in vars(Options) if name.startswith("opt_")}
    assert {"smtp", "smtps", "submission", "version"} <= options
    assert documented == options


# Defined in mailguard.replies but never sent today.
NOT_SENT = {(421, "4.3.2")}


def test_the_reply_table_matches_the_replies_mailguard_sends():
    text = section(reference(), "Replies")
    documented = {(int(c), s) for c, s in re.findall(r"`([2-5]\d\d) ([245]\.\d{1,3}\.\d{1,3})\b", text)}
    documented |= {(int(c), s) for c, s in re.findall(r"/ `([2-5]\d\d) ([245]\.\d{1,3}\.\d{1,3})`", text)}
    sent = {(r.code, r.status) for r in replies.all_replies().values() if r.status}
    assert sorted(sent - documented - NOT_SENT) == [], "sent, not in the reference's reply table"
    assert sorted(documented - sent) == [], "in the reference's reply table, not in mailguard.replies"
    for r in replies.all_replies().values():
        if not r.status:
            assert f"`{r.code} " in text, r


# --- setting names wherever the documents mention them -----------------------

def _defined_names() -> set[str]:
    """Classes, functions and module-level names defined in the code: the
    documents may name those too."""
    out = set()
    for folder in ("mailguard", "twisted", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.add(node.name)
                elif isinstance(node, ast.Assign):
                    out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return out


def _setting_like() -> re.Pattern:
    """Words shaped like a setting: the first word of a setting name
    (``Smtp``, ``Gateway``, ``VRFY``...) followed by more CamelCase."""
    firsts = {re.match(r"[A-Z]+(?=[A-Z][a-z])|[A-Z][a-z0-9]+|[A-Z]+", s.name).group(0) for s in SCALARS}
    return re.compile(r"\b(?:%s)[A-Z][A-Za-z0-9]*\b" % "|".join(sorted(firsts)))


def unknown_setting_names(text: str, known: set[str]) -> list[str]:
    return sorted({m.group(0) for m in _setting_like().finditer(text)} - known)


# Names a document may mention although mailguard does not read them: the
# misspellings the checks warn about, quoted as examples, and a Kerio
# section name.
NOT_READ: set[str] = {"SmtpGreetingDelai", "SmtpMaxConectionsPerIp", "QueueLifeTime", "SmtpServer"}


def test_every_setting_name_in_the_documents_is_one_mailguard_reads():
    known = {s.name for s in SCALARS} | _defined_names() | NOT_READ
    for doc in documents():
        unknown = unknown_setting_names(doc.read_text(encoding="utf-8"), known)
        assert unknown == [], f"{doc.relative_to(ROOT)}: not settings mailguard reads: {unknown}"


def test_a_misspelt_setting_is_caught():
    known = {s.name for s in SCALARS} | _defined_names()
    text = "Set `SmtpGreetingDelays` (sic), `VRFYEnable=1` and `GatewayCacheTTL`; `RelayQueue` is a class, VRFYs are commands."
    assert unknown_setting_names(text, known) == ["GatewayCacheTTL", "SmtpGreetingDelays", "VRFYEnable"]


def collections_documented() -> dict[str, set[str]]:
    rows = tables(section(reference(), "Record collections"))[0]
    return {ticked(row["collection"])[0]: set(ticked(row["columns read"])) for row in rows}


def test_the_documented_collections_and_columns_are_read_by_the_code():
    literals = set()
    for module in ("settings.py", "records.py"):  # the collections are read in records.py
        source = (ROOT / "mailguard" / "config" / module).read_text(encoding="utf-8")
        literals |= {n.value for n in ast.walk(ast.parse(source))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    documented = collections_documented()
    assert set(documented) == {"Domain", "IpAddressGroup", "User", "Alias"}
    for name, columns in documented.items():
        assert name in literals and columns <= literals, (name, columns - literals)


def test_every_variable_in_an_xml_example_is_a_setting_or_a_column():
    known = {s.name for s in SCALARS}
    for columns in collections_documented().values():
        known |= columns
    for doc in documents():
        for name in re.findall(r"""<variable\s+name=["']([^"']*)["']""", doc.read_text(encoding="utf-8")):
            if name == "..." or name.isupper():  # placeholders: NAME, ...
                continue
            assert name in known, f"{doc.relative_to(ROOT)}: <variable name={name!r}> is not read by mailguard"
