"""A reader for Kerio's configuration XML that keeps line numbers.

Kerio writes ``mailserver.cfg`` and ``users.cfg`` as a ``<config>`` root
holding ``<variable name=...>`` scalars, ``<table name=...>`` of
``<tablerow>`` records and ``<list name=...>`` of ``<listitem>`` values or
records.  This module turns that into plain values that remember where they
came from; it knows nothing of which names mailguard uses (that is
``mailguard.config.settings``), so the hundreds of other names in a real Kerio file
pass through untouched.

expat is used directly (not ElementTree) because it reports line numbers and
lets us refuse DOCTYPE and entity declarations outright: a configuration file
has no use for them, and expanding them is how billion-laughs and external
entity attacks work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.parsers import expat

from mailguard.config.problems import ConfigError, Problem, Where


@dataclass
class Variable:
    name: str
    value: str
    where: Where


@dataclass
class Row:
    """A tablerow, or a listitem: either a text value or a record."""

    where: Where
    variables: dict[str, Variable] = field(default_factory=dict)
    text: str = ""
    collections: dict[str, "Collection"] = field(default_factory=dict)

    def get(self, *names: str) -> Variable | None:
        """The first of C{names} present, matched case-insensitively
        (Kerio is consistent, hand-edited files are not)."""
        for name in names:
            v = self.variables.get(name)
            if v is None:
                v = self._folded().get(name.lower())
            if v is not None:
                return v
        return None

    def _folded(self) -> dict[str, Variable]:
        return {k.lower(): v for k, v in self.variables.items()}


@dataclass
class Collection:
    name: str
    kind: str  # "table" or "list"
    where: Where
    rows: list[Row] = field(default_factory=list)


@dataclass
class Document:
    path: str
    variables: dict[str, Variable] = field(default_factory=dict)
    collections: dict[str, Collection] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


class _Refused(Exception):
    pass


class _Builder:
    """expat callbacks building a L{Document}."""

    def __init__(self, path: str, parser) -> None:
        self.path = path
        self.parser = parser
        self.doc = Document(path)
        # Stack of (element name, container) where container is the
        # Document, a Collection or a Row; None for ignored subtrees.
        self.stack: list[tuple[str, object]] = []
        self.text: list[str] = []
        self.current_var: tuple[str, Where] | None = None
        self.seen_root = False

    def where(self) -> Where:
        return Where(self.path, self.parser.CurrentLineNumber)

    def problem(self, message: str, severity: str = "error") -> None:
        self.doc.problems.append(Problem(self.where(), message, severity))

    # -- refusals ----------------------------------------------------------
    def doctype(self, *args) -> None:
        raise _Refused("DOCTYPE declarations are not allowed in a configuration file")

    def entity(self, *args) -> None:
        raise _Refused("entity declarations are not allowed in a configuration file")

    # -- elements ------------------------------------------------------------
    def start(self, tag: str, attrs: dict[str, str]) -> None:
        parent = self.stack[-1][1] if self.stack else None
        where = self.where()
        if not self.stack:
            if tag != "config":
                self.problem(f"root element is <{tag}>, expected <config>")
            self.seen_root = True
            self.stack.append((tag, self.doc))
            return
        if parent is None:  # inside an ignored subtree
            self.stack.append((tag, None))
            return
        if tag == "variable":
            name = attrs.get("name")
            if not name:
                self.problem("<variable> without a name attribute")
            self.current_var = (name or "", where)
            self.text = []
            self.stack.append((tag, None))
        elif tag in ("table", "list"):
            name = attrs.get("name")
            if not name:
                self.problem(f"<{tag}> without a name attribute")
                self.stack.append((tag, None))
                return
            coll = Collection(name, tag, where)
            if isinstance(parent, Document):
                if name in parent.collections:
                    # Kerio never splits a collection; merge so nothing is lost.
                    coll = parent.collections[name]
                else:
                    parent.collections[name] = coll
            elif isinstance(parent, Row):
                parent.collections[name] = coll
            else:
                self.problem(f"<{tag}> is not allowed inside <{self.stack[-1][0]}>")
                coll = None
            self.stack.append((tag, coll))
        elif tag in ("tablerow", "listitem"):
            if not isinstance(parent, Collection):
                self.problem(f"<{tag}> outside a <table> or <list>")
                self.stack.append((tag, None))
                return
            row = Row(where)
            parent.rows.append(row)
            self.text = []
            self.stack.append((tag, row))
        else:
            # Unknown elements are tolerated and skipped (a newer Kerio may
            # write shapes we do not use).
            self.stack.append((tag, None))

    def end(self, tag: str) -> None:
        _, container = self.stack.pop()
        if tag == "variable" and self.current_var is not None:
            name, where = self.current_var
            self.current_var = None
            value = "".join(self.text)
            self.text = []
            parent = self.stack[-1][1] if self.stack else None
            if not name:
                return
            if isinstance(parent, Document):
                if name in parent.variables:
                    prev = parent.variables[name]
                    self.doc.problems.append(Problem(
                        where,
                        f'variable "{name}" is set twice (first at line '
                        f"{prev.where.line}); the last value is used",
                        "warning"))
                parent.variables[name] = Variable(name, value, where)
            elif isinstance(parent, Row):
                parent.variables[name] = Variable(name, value, where)
            elif parent is not None:
                self.doc.problems.append(Problem(
                    where, f'<variable name="{name}"> is not allowed here'))
        elif tag == "listitem" and isinstance(container, Row):
            if not container.variables and not container.collections:
                container.text = "".join(self.text).strip()
            self.text = []

    def chars(self, data: str) -> None:
        self.text.append(data)


def parse_bytes(data: bytes, path: str) -> Document:
    """Parse a Kerio configuration; structural problems are collected in
    C{Document.problems}, fatal ones (malformed XML, DTDs) raise
    L{ConfigError}."""
    parser = expat.ParserCreate("UTF-8")
    builder = _Builder(path, parser)
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.chars
    parser.StartDoctypeDeclHandler = builder.doctype
    parser.EntityDeclHandler = builder.entity
    parser.ExternalEntityRefHandler = lambda *a: 0
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(data, True)
    except _Refused as e:
        raise ConfigError([Problem(Where(path, parser.CurrentLineNumber), str(e))])
    except expat.ExpatError as e:
        msg = expat.errors.messages.get(e.code, str(e))
        raise ConfigError([Problem(Where(path, e.lineno), f"malformed XML: {msg} (column {e.offset + 1})")])
    if not builder.seen_root:
        raise ConfigError([Problem(Where(path, 1), "no <config> root element")])
    return builder.doc


def parse_file(path: str) -> Document:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([Problem(Where(path, 0), f"cannot read: {e.strerror}")])
    return parse_bytes(data, path)
