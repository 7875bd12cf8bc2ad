"""What a Python developer does first: ``pip install -e '.[test]'`` into a
fresh virtual environment, then ``twistd mailguard`` from any directory.

Twisted finds plugins by scanning ``sys.path`` for ``twisted/plugins``
directories; setuptools' default editable install maps the packages with an
import hook instead, which that scan never sees, so ``twistd mailguard`` was
an unknown command everywhere but the project directory (where twistd puts
the working directory on ``sys.path``).  ``package-dir`` in pyproject.toml
makes the editable install a ``.pth`` line that puts the project on
``sys.path``.  A real install with pip, from the package index this machine
uses; nothing is faked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def test_editable_install_runs_twistd_mailguard_from_any_directory(tmp_path):
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    pip = _run([str(venv / "bin" / "pip"), "install", "-q", "-e", f"{ROOT}[test]"], cwd=tmp_path)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    twistd = str(venv / "bin" / "twistd")
    listed = _run([twistd, "--help"], cwd=elsewhere, timeout=60)
    assert "mailguard" in listed.stdout, listed.stdout + listed.stderr
    helped = _run([twistd, "mailguard", "--help"], cwd=elsewhere, timeout=60)
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert "Unknown command" not in helped.stdout + helped.stderr
    assert "Usage: twistd [options] mailguard [options]" in helped.stdout
    assert "--relay-host=" in helped.stdout
    # The plugin is the project's own file, not a copy: edits show at once.
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import mailguard, twisted.plugins.mailguard_plugin as p; print(mailguard.__file__); print(p.__file__)"],
                 cwd=elsewhere, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(ROOT / "mailguard" / "__init__.py"),
                                    str(ROOT / "twisted" / "plugins" / "mailguard_plugin.py")]
