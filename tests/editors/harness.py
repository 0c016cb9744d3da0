"""What the editor tests share: finding the editors, clean environments, warmed HOMEs.

The editors are installed by ``tests/editors/provision.sh``. Under CI (``$CI`` set) a missing
editor fails the test with the command that installs it; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROVISION = ROOT / "tests" / "editors" / "provision.sh"
GIMP_CHROOT = Path(os.environ.get("GENFILL_GIMP_CHROOT", "/var/cache/genfill-ci/gimp-trixie"))


def require(what: str, present: bool) -> None:
    """Fails under CI, skips elsewhere, when an editor is missing."""
    if present:
        return
    message = f"{what} is not installed: run 'sudo {PROVISION.relative_to(ROOT)}' first"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for an editor: its own HOME and nothing from this test's virtualenv.

    Krita's embedded Python follows PATH to a virtualenv's python and then finds neither
    PyQt5 nor its own modules, so PATH is the system's alone.
    """
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_RUNTIME_DIR": str(home / ".runtime"),
    }
    (home / ".runtime").mkdir(mode=0o700, parents=True, exist_ok=True)
    env.update(extra)
    return env


def copy_home(template: Path, target: Path) -> Path:
    shutil.copytree(template, target, symlinks=True)
    return target


def run(command: list[str], *, env: dict[str, str], timeout_s: int, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs an editor under ``timeout`` (the editor may hang; the test must not)."""
    return subprocess.run(
        ["timeout", "--kill-after=10", str(timeout_s), *command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
    )


def screenshot_folder(what: str) -> Path:
    """A fresh temp folder for a test's screenshots, kept after the run (pytest's own temp
    folders are pruned when other runs start) and never inside the repository."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"genfill-{what}-screenshots-"))
