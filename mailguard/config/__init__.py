"""Configuration: Kerio files in, frozen typed data out.

This package imports nothing from the rest of mailguard: every other layer
may depend on it, never the reverse.  ``load`` and ``read`` are the public
entry points (``from mailguard.config import load``).
"""

from mailguard.config.problems import ConfigError, Problem
from mailguard.config.settings import Configuration, load, read

__all__ = ["Configuration", "ConfigError", "Problem", "load", "read"]
