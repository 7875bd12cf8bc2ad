"""The record collections of a Kerio configuration: their types, and how
they are read from the files' rows.

Records are plain values with the place they were read from, so every later
check can point at the line.  ``mailguard.config.settings`` reads them with
the functions below; the IP groups (``mailguard.policy.ipgroups``) and the
user directory (``mailguard.policy.directory``) are built from them.

Every name and address is checked here, where the line is known: a user
name becomes a directory and every address may reach the wire, so control
characters, spaces, path separators and the like are ``FILE:LINE`` errors
(``mailguard.config.values``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailguard.config.kerioxml import Collection, Document, Row
from mailguard.config.problems import NOWHERE, Problem, Where
from mailguard.config.values import (
    parse_bool,
    parse_hostname,
    parse_list,
    parse_local_part,
    parse_name_or_address,
    shown,
)


@dataclass(frozen=True, slots=True)
class DomainRecord:
    name: str  # lower case, no trailing dot
    aliases: tuple[str, ...] = ()  # lower case domain aliases
    where: Where = NOWHERE


@dataclass(frozen=True, slots=True)
class IpGroupRow:
    group: str
    address: str  # "1.2.3.4", "10.0.0.0/8", "A-B", "::1", "group:NAME"
    enabled: bool = True
    description: str = ""
    where: Where = NOWHERE


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str  # local part as written
    domain: str  # lower case
    password: str | None = None  # plain text, "SHA:..." or another form
    enabled: bool = True
    aliases: tuple[str, ...] = ()  # extra local parts (or full addresses)
    where: Where = NOWHERE

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"


@dataclass(frozen=True, slots=True)
class AliasRecord:
    name: str  # local part
    domain: str
    deliver_to: tuple[str, ...] = ()  # addresses (local or not) or local parts
    where: Where = NOWHERE

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"


# --- reading the collections ---------------------------------------------------

def rows(doc: Document, name: str) -> list[Row]:
    """Rows of collection C{name} (table or list, either form; the name
    matched case-insensitively)."""
    coll: Collection | None = doc.collections.get(name)
    if coll is None:
        for k, v in doc.collections.items():
            if k.lower() == name.lower():
                coll = v
                break
    return coll.rows if coll else []


def _value(row: Row, *names: str, default: str = "") -> str:
    v = row.get(*names)
    return v.value.strip() if v is not None else default


def _where(row: Row, *names: str) -> Where:
    v = row.get(*names)
    return v.where if v is not None else row.where


def _row_bool(row: Row, name: str, problems: list[Problem], what: str, default: bool = True) -> bool:
    v = row.get(name)
    if v is None or v.value.strip() == "":
        return default
    try:
        return parse_bool(v.value)
    except ValueError as e:
        problems.append(Problem(v.where, f'{what}: variable "{name}": {e}'))
        return default


def read_domains(doc: Document, problems: list[Problem]) -> list[DomainRecord]:
    out = []
    for row in rows(doc, "Domain"):
        if row.text and not row.items:
            name = row.text  # a list of plain domain names
        else:
            name = _value(row, "Name", "Domain")
        if not name:
            problems.append(Problem(row.where, 'Domain: row without "Name" (or "Domain")'))
            continue
        try:
            name = parse_hostname(name)
        except ValueError as e:
            problems.append(Problem(_where(row, "Name", "Domain"), f"Domain: {e}"))
            continue
        aliases = []
        for a in parse_list(_value(row, "Aliases")):
            try:
                aliases.append(parse_hostname(a))
            except ValueError as e:
                problems.append(Problem(_where(row, "Aliases"), f"Domain {name}: alias: {e}"))
        out.append(DomainRecord(name, tuple(aliases), row.where))
    return out


def read_ip_rows(doc: Document, problems: list[Problem]) -> list[IpGroupRow]:
    out = []
    for row in rows(doc, "IpAddressGroup"):
        group = _value(row, "Group", "Name")
        address = row.get("Address")
        if not group:
            problems.append(Problem(row.where, 'IpAddressGroup: row without "Group"'))
            continue
        if address is None or not address.value.strip():
            problems.append(Problem(row.where, f'IpAddressGroup "{group}": row without "Address"'))
            continue
        enabled = _row_bool(row, "Enabled", problems, f'IpAddressGroup "{group}"')
        out.append(IpGroupRow(group, address.value.strip(), enabled, _value(row, "Description"),
                              address.where))
    return out


def _name_and_domain(row: Row, kind: str, problems: list[Problem],
                     default_domain: str | None) -> tuple[str, str] | None:
    """A User or Alias row's local part and domain ("Name" may hold a whole
    address); a row without "Domain" belongs to the only local domain.
    Both are checked: see L{mailguard.config.values.parse_local_part}."""
    name = _value(row, "Name")
    domain = _value(row, "Domain")
    if "@" in name and not domain:
        name, domain = name.rsplit("@", 1)
    if not name:
        problems.append(Problem(row.where, f'{kind}: row without "Name"'))
        return None
    try:
        name = parse_local_part(name, "name")
    except ValueError as e:
        problems.append(Problem(_where(row, "Name"), f"{kind}: {e}"))
        return None
    if not domain:
        if default_domain is None:
            problems.append(Problem(row.where, f'{kind} "{name}": no "Domain" and no single local domain to assume'))
            return None
        domain = default_domain
    try:
        domain = parse_hostname(domain)
    except ValueError as e:
        problems.append(Problem(_where(row, "Domain", "Name"), f"{kind} {shown(name)}: {e}"))
        return None
    return name, domain


def _names(row: Row, column: str, kind: str, owner: str, what: str,
           problems: list[Problem]) -> tuple[str, ...]:
    """The comma-separated names or addresses of C{column}, each checked."""
    out = []
    for item in parse_list(_value(row, column)):
        try:
            out.append(parse_name_or_address(item, what))
        except ValueError as e:
            problems.append(Problem(_where(row, column), f"{kind} {shown(owner)}: {e}"))
    return tuple(out)


def _named_rows(doc: Document, kind: str, problems: list[Problem], default_domain: str | None):
    """(row, local part, domain) of each row of collection C{kind} whose
    name and domain are good (L{_name_and_domain})."""
    for row in rows(doc, kind):
        found = _name_and_domain(row, kind, problems, default_domain)
        if found is not None:
            yield row, *found


def read_users(doc: Document, problems: list[Problem], default_domain: str | None) -> list[UserRecord]:
    out = []
    for row, name, domain in _named_rows(doc, "User", problems, default_domain):
        pw = row.get("Password")  # PasswordHistory is never read
        out.append(UserRecord(
            name=name,
            domain=domain,
            password=pw.value if pw is not None and pw.value != "" else None,
            enabled=_row_bool(row, "Enabled", problems, f'User "{name}@{domain}"'),
            aliases=_names(row, "Aliases", "User", f"{name}@{domain}", "alias", problems),
            where=row.where,
        ))
    return out


def read_aliases(doc: Document, problems: list[Problem], default_domain: str | None) -> list[AliasRecord]:
    out = []
    for row, name, domain in _named_rows(doc, "Alias", problems, default_domain):
        if not parse_list(_value(row, "DeliverTo")):
            problems.append(Problem(row.where, f'Alias "{name}": no "DeliverTo"'))
            continue
        target = _names(row, "DeliverTo", "Alias", f"{name}@{domain}", "DeliverTo address", problems)
        if target:
            out.append(AliasRecord(name, domain, target, row.where))
    return out
