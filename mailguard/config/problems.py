"""Configuration problems, reported as ``FILE:LINE: message``.

Every layer that reads configuration (the XML reader, the typed loader, the
IP groups, the user directory) reports what is wrong as L{Problem} values
instead of raising at the first one, so ``mailguard check`` can list all of
them at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Where(NamedTuple):
    """A place in a configuration file.

    A named tuple, not a dataclass: a real configuration has hundreds of
    thousands of elements, each remembering its place, and a tuple is the
    cheapest immutable, ordered value Python has (half the memory of a
    frozen dataclass and five times faster to make)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


NOWHERE = Where("<embedded>", 0)


@dataclass(frozen=True)
class Problem:
    where: Where
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.where}: {tag}{self.message}"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class ConfigError(Exception):
    """The configuration cannot be used; C{problems} says why, all at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def errors(problems) -> list[Problem]:
    return [p for p in problems if p.is_error]
