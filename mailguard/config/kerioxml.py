"""A reader for Kerio's configuration XML that keeps line numbers.

Kerio writes ``mailserver.cfg`` and ``users.cfg`` as a ``<config>`` root
holding

  - ``<variable name=...>`` scalars;
  - ``<table name=...>`` elements holding ``<variable>`` elements directly:
    a *section* of settings (real files group most settings this way:
    ``Administration`` -> ``BuiltInAdminEnabled``, ``Directories`` ->
    ``StoreDir``, ``LogGlobal`` -> ``RelativePathsRoot``);
  - ``<table name=...>`` of ``<tablerow>`` records and ``<list name=...>``
    of ``<listitem>`` values or records.

This module turns that into plain values that remember where they came
from; it knows nothing of which names mailguard uses (that is
``mailguard.config.settings``), so the hundreds of other names in a real
Kerio file pass through untouched.

expat is used directly (not ElementTree) because it reports line numbers and
lets us refuse DOCTYPE and entity declarations outright: a configuration file
has no use for them, and expanding them is how billion-laughs and external
entity attacks work.  The file is fed to expat in blocks (never read whole),
and every node is a slotted object or a tuple: a 100,000-row IP group must
be checked in well under 100 MB.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple
from xml.parsers import expat

from mailguard.config.problems import ConfigError, Problem, Where

_new_tuple = tuple.__new__


class Variable(NamedTuple):
    """One ``<variable>``: its place is kept as file and line (one tuple,
    not two), and made a L{Where} when asked."""

    name: str
    value: str
    file: str
    line: int

    @property
    def where(self) -> Where:
        return _new_tuple(Where, (self.file, self.line))


@dataclass(slots=True)
class Row:
    """A tablerow, or a listitem: either a text value or a record.

    A record's variables are kept flat, C{(name, value, line offset) * n}
    in one tuple, not as a dict of L{Variable}s: a real users.cfg or IP
    group has 100,000 rows, and this is a third of the memory.  The line
    offset from the row's own line is small, so it is one of Python's
    cached small ints.  L{get} and L{variables} give L{Variable}s.
    """

    file: str
    line: int
    items: tuple | list = ()
    text: str = ""
    # Collections nested in the record; None (not an empty dict) when there
    # are none, which is almost always.
    nested: dict[str, "Collection"] | None = None

    @property
    def where(self) -> Where:
        return _new_tuple(Where, (self.file, self.line))

    @property
    def collections(self) -> dict[str, "Collection"]:
        return self.nested or {}

    def _variable(self, i: int) -> Variable:
        items = self.items
        return _new_tuple(Variable, (items[i], items[i + 1], self.file, self.line + items[i + 2]))

    @property
    def variables(self) -> dict[str, Variable]:
        """The record's variables by name (the last of a repeated name)."""
        return {self.items[i]: self._variable(i) for i in range(0, len(self.items), 3)}

    def get(self, *names: str) -> Variable | None:
        """The first of C{names} present (the last of a repeated name),
        matched case-insensitively (Kerio is consistent, hand-edited files
        are not)."""
        items = self.items
        last = len(items) - 3
        found = items[last::-3]  # the names, last first
        for name in names:
            if name in found:
                return self._variable(last - 3 * found.index(name))
        folded = [n.lower() for n in found]
        for name in names:
            lower = name.lower()
            if lower in folded:
                return self._variable(last - 3 * folded.index(lower))
        return None


@dataclass(slots=True)
class Collection:
    """A ``<table>`` or a ``<list>``.  Its C{rows} are records; its
    C{variables}, when a table holds ``<variable>`` elements directly, make
    it a section of settings."""

    name: str
    kind: str  # "table" or "list"
    where: Where
    rows: list[Row] = field(default_factory=list)
    variables: dict[str, Variable] = field(default_factory=dict)
    collections: dict[str, "Collection"] = field(default_factory=dict)

    @property
    def is_section(self) -> bool:
        return bool(self.variables)


@dataclass(slots=True)
class Document:
    path: str
    variables: dict[str, Variable] = field(default_factory=dict)
    collections: dict[str, Collection] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def settings(self) -> Iterator[tuple[Variable, str | None]]:
        """Every scalar setting with the section that holds it (None at the
        top level): top-level variables first, then each section's, in
        file order.  Variables inside records are not settings."""
        for var in self.variables.values():
            yield var, None
        for coll in self.collections.values():
            for var in coll.variables.values():
                yield var, coll.name


class paused_gc:
    """A context in which the cyclic garbage collector does not run.

    Reading a configuration builds hundreds of thousands of objects and no
    reference cycles: the collector would only walk the growing heap again
    and again (a third of the time of a 100,000-row file).  Nests; the
    collector's previous state is restored on exit."""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc) -> None:
        if self.was:
            gc.enable()


class _Refused(Exception):
    pass


class _Builder:
    """expat callbacks building a L{Document}.

    Text is collected only where it is used -- inside a ``<variable>`` and
    directly inside a ``<listitem>`` -- by pointing expat's character
    handler at that element's list (C{list.append}, no Python frame per
    call) and at nothing elsewhere.  Names, and a value equal to the
    previous value of the same name (the group of every row of an IP group,
    the domain of every user), are shared rather than copied."""

    def __init__(self, path: str, parser) -> None:
        self.path = path
        self.parser = parser
        self.doc = Document(path)
        # Stack of (element name, container) where container is the
        # Document, a Collection or a Row; None for ignored subtrees.
        self.stack: list[tuple[str, object]] = []
        self.text: list[str] = []
        self.current_var: tuple[str, int] | None = None
        self.seen_root = False
        self.names: dict[str, str] = {}
        self.last_value: dict[str, str] = {}

    def where(self) -> Where:
        return _new_tuple(Where, (self.path, self.parser.CurrentLineNumber))

    def problem(self, message: str, severity: str = "error") -> None:
        self.doc.problems.append(Problem(self.where(), message, severity))

    def collect(self) -> None:
        """Send the text that follows to a fresh C{self.text}."""
        self.text = []
        self.parser.CharacterDataHandler = self.text.append

    # -- refusals ----------------------------------------------------------
    def doctype(self, *args) -> None:
        raise _Refused("DOCTYPE declarations are not allowed in a configuration file")

    def entity(self, *args) -> None:
        raise _Refused("entity declarations are not allowed in a configuration file")

    # -- elements ------------------------------------------------------------
    def start(self, tag: str, attrs: dict[str, str]) -> None:
        stack = self.stack
        parent = stack[-1][1] if stack else self
        if parent is None:  # inside an ignored subtree
            stack.append((tag, None))
            return
        if tag == "variable":  # most elements: kept short
            name = attrs.get("name")
            if not name:
                self.problem("<variable> without a name attribute")
                name = ""
            self.current_var = (self.names.setdefault(name, name), self.parser.CurrentLineNumber)
            self.text = text = []
            self.parser.CharacterDataHandler = text.append
            stack.append((tag, None))
            return
        self.parser.CharacterDataHandler = None
        if parent is self:
            if tag != "config":
                self.problem(f"root element is <{tag}>, expected <config>")
            self.seen_root = True
            stack.append((tag, self.doc))
        elif tag == "tablerow" or tag == "listitem":
            if not isinstance(parent, Collection):
                self.problem(f"<{tag}> outside a <table> or <list>")
                stack.append((tag, None))
                return
            row = Row(self.path, self.parser.CurrentLineNumber, [])
            parent.rows.append(row)
            if tag == "listitem":
                self.collect()
            stack.append((tag, row))
        elif tag == "table" or tag == "list":
            name = attrs.get("name")
            if not name:
                self.problem(f"<{tag}> without a name attribute")
                stack.append((tag, None))
                return
            coll = Collection(name, tag, self.where())
            if isinstance(parent, Row):
                if parent.nested is None:
                    parent.nested = {}
                parent.nested[name] = coll
            elif name in parent.collections:
                # Kerio never splits a collection; merge so nothing is lost.
                coll = parent.collections[name]
            else:
                parent.collections[name] = coll
            stack.append((tag, coll))
        else:
            # Unknown elements are tolerated and skipped (a newer Kerio may
            # write shapes we do not use).
            stack.append((tag, None))

    def end(self, tag: str) -> None:
        stack = self.stack
        container = stack.pop()[1]
        self.parser.CharacterDataHandler = None
        parent = stack[-1][1] if stack else None
        if tag == "variable":
            if self.current_var is None or parent is None:
                return
            name, line = self.current_var
            self.current_var = None
            value = "".join(self.text)
            last = self.last_value
            if last.get(name) == value:
                value = last[name]
            else:
                last[name] = value
            if parent.__class__ is Row:
                parent.items.extend((name, value, line - parent.line))
            elif name:
                self.setting(parent.variables, _new_tuple(Variable, (name, value, self.path, line)))
            return
        if container.__class__ is Row:
            container.items = tuple(container.items)
            if tag == "listitem" and not container.items and not container.nested:
                container.text = "".join(self.text).strip()
        elif parent.__class__ is Row and stack[-1][0] == "listitem" and not parent.items:
            # Back in a listitem's own text (after an ignored element).
            self.parser.CharacterDataHandler = self.text.append

    def setting(self, variables: dict[str, Variable], var: Variable) -> None:
        """A top-level or section variable; set twice in one place is a
        warning (the last value is used)."""
        prev = variables.get(var.name)
        if prev is not None:
            self.doc.problems.append(Problem(
                var.where,
                f'variable "{var.name}" is set twice (first at line '
                f"{prev.line}); the last value is used",
                "warning"))
        variables[var.name] = var


def _parser(path: str) -> tuple[object, _Builder]:
    parser = expat.ParserCreate("UTF-8")
    # One callback per run of text, not one per line of it.
    parser.buffer_text = True
    parser.CharacterDataHandler = None
    builder = _Builder(path, parser)
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.StartDoctypeDeclHandler = builder.doctype
    parser.EntityDeclHandler = builder.entity
    parser.ExternalEntityRefHandler = lambda *a: 0
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    return parser, builder


def _run(path: str, feed) -> Document:
    """Parse with C{feed(parser)}; structural problems are collected in
    C{Document.problems}, fatal ones (malformed XML, DTDs) raise
    L{ConfigError}."""
    parser, builder = _parser(path)
    try:
        with paused_gc():
            feed(parser)
    except _Refused as e:
        raise ConfigError([Problem(Where(path, parser.CurrentLineNumber), str(e))])
    except expat.ExpatError as e:
        msg = expat.errors.messages.get(e.code, str(e))
        raise ConfigError([Problem(Where(path, e.lineno), f"malformed XML: {msg} (column {e.offset + 1})")])
    if not builder.seen_root:
        raise ConfigError([Problem(Where(path, 1), "no <config> root element")])
    return builder.doc


def parse_bytes(data: bytes, path: str) -> Document:
    """Parse a Kerio configuration held in memory."""
    return _run(path, lambda parser: parser.Parse(data, True))


def parse_file(path: str) -> Document:
    """Parse a Kerio configuration file, fed to expat in blocks."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError([Problem(Where(path, 0), f"cannot read: {e.strerror}")])
    with f:
        try:
            return _run(path, lambda parser: parser.ParseFile(f))
        except OSError as e:
            raise ConfigError([Problem(Where(path, 0), f"cannot read: {e.strerror}")])
