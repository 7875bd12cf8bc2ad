"""mailguard: an SMTP server for Twisted that keeps spam out at the door."""

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"


def version_line() -> str:
    """What ``--version`` prints and the start-up log begins with; Twisted's
    and Python's versions too, for bug reports."""
    import platform

    from twisted import version as twisted_version

    return f"mailguard {__version__} (Twisted {twisted_version.short()}, Python {platform.python_version()})"
