"""``genfill plugin install krita|gimp``: puts a plug-in where the editor looks for it.

Each plug-in is installed self-contained: the plug-in's own files plus a copy of this bridge
(with the vendored websockets) inside it, because the editor runs it with its own Python,
which has no genfill installed.

Installed layouts::

    Krita   <pykrita>/genfill_krita.desktop
            <pykrita>/genfill_krita/...            (the plug-in package)
            <pykrita>/genfill_krita/genfill_bridge/
    GIMP 3  <plug-ins>/genfill/genfill.py          (executable: GIMP skips it otherwise)
            <plug-ins>/genfill/genfill_bridge/
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

EDITORS = ("krita", "gimp")
KRITA_PLUGIN = "genfill_krita"
GIMP_PLUGIN = "genfill"
_BRIDGE = Path(__file__).resolve().parent
_SOURCES = _BRIDGE.parent
# Files of the bridge the editors do not need.
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "install.py")


@dataclass(frozen=True)
class Installed:
    editor: str
    folder: Path
    files: list[Path]
    enabled_in: Path | None = None


def plugin_folder(editor: str, *, platform: str = sys.platform, env: dict | None = None, home: Path | None = None) -> Path:
    """The per-user folder the editor loads plug-ins from.

    Krita: ``pykrita`` in its resource folder (Linux ``$XDG_DATA_HOME/krita`` or
    ``~/.local/share/krita``; macOS ``~/Library/Application Support/krita``; Windows
    ``%APPDATA%\\krita``). GIMP 3: ``GIMP/3.0/plug-ins`` in the user config folder (Linux
    ``$XDG_CONFIG_HOME`` or ``~/.config``; macOS ``~/Library/Application Support``; Windows
    ``%APPDATA%``).
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    _check_editor(editor)
    if platform == "win32":
        appdata = Path(env.get("APPDATA") or home / "AppData" / "Roaming")
        return appdata / "krita" / "pykrita" if editor == "krita" else appdata / "GIMP" / "3.0" / "plug-ins"
    if platform == "darwin":
        support = home / "Library" / "Application Support"
        return support / "krita" / "pykrita" if editor == "krita" else support / "GIMP" / "3.0" / "plug-ins"
    if editor == "krita":
        return Path(env.get("XDG_DATA_HOME") or home / ".local" / "share") / "krita" / "pykrita"
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "GIMP" / "3.0" / "plug-ins"


def kritarc_path(*, platform: str = sys.platform, env: dict | None = None, home: Path | None = None) -> Path:
    """Krita's settings file, where ``[python] enable_<plugin>=true`` switches a plug-in on."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    if platform == "win32":
        return Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local") / "kritarc"
    if platform == "darwin":
        return home / "Library" / "Preferences" / "kritarc"
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kritarc"


def install(editor: str, dest: Path | None = None, *, enable: bool = True) -> Installed:
    """Copies the plug-in for ``editor`` into ``dest`` (default: ``plugin_folder(editor)``).

    Replaces an older copy. For Krita, ``enable`` also switches the plug-in on in kritarc
    (only when installing to the default folder: a ``dest`` is for tests and packagers).

    Raises:
        ValueError: ``editor`` is not ``krita`` or ``gimp``.
        FileNotFoundError: the plug-in sources are not installed with genfill.
    """
    _check_editor(editor)
    folder = Path(dest) if dest is not None else plugin_folder(editor)
    folder.mkdir(parents=True, exist_ok=True)
    if editor == "krita":
        source = _source("krita")
        package = folder / KRITA_PLUGIN
        _replace_tree(source / KRITA_PLUGIN, package)
        shutil.copytree(_BRIDGE, package / "genfill_bridge", ignore=_IGNORE)
        shutil.copy2(source / f"{KRITA_PLUGIN}.desktop", folder / f"{KRITA_PLUGIN}.desktop")
        enabled_in = None
        if enable and dest is None:
            enabled_in = enable_in_kritarc(kritarc_path())
        return Installed(editor, folder, [folder / f"{KRITA_PLUGIN}.desktop", package], enabled_in)
    source = _source("gimp")
    package = folder / GIMP_PLUGIN
    _replace_tree(source / GIMP_PLUGIN, package)
    shutil.copytree(_BRIDGE, package / "genfill_bridge", ignore=_IGNORE)
    script = package / f"{GIMP_PLUGIN}.py"
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return Installed(editor, folder, [script])


def build_krita_zip(output: Path) -> Path:
    """Writes a zip that Krita's *Tools > Scripts > Import Python Plugin from File* accepts:
    ``genfill_krita.desktop`` and the ``genfill_krita/`` package at its top level."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    source = _source("krita")
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(source / f"{KRITA_PLUGIN}.desktop", f"{KRITA_PLUGIN}.desktop")
        _zip_tree(archive, source / KRITA_PLUGIN, KRITA_PLUGIN)
        _zip_tree(archive, _BRIDGE, f"{KRITA_PLUGIN}/genfill_bridge")
    return output


def enable_in_kritarc(path: Path, plugin: str = KRITA_PLUGIN) -> Path:
    """Sets ``enable_<plugin>=true`` in the ``[python]`` group of kritarc, keeping the rest.

    Edited as text, not through configparser: kritarc holds keys and values configparser
    would rewrite. Krita rewrites kritarc on exit, so run this while Krita is closed.
    """
    key = f"enable_{plugin}"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    start = next((i for i, line in enumerate(lines) if line.strip() == "[python]"), None)
    if start is None:
        lines += ([""] if lines and lines[-1].strip() else []) + ["[python]", f"{key}=true"]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        existing = next((i for i in range(start + 1, end) if lines[i].split("=", 1)[0].strip() == key), None)
        if existing is None:
            lines.insert(start + 1, f"{key}=true")
        else:
            lines[existing] = f"{key}=true"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _check_editor(editor: str) -> None:
    if editor not in EDITORS:
        raise ValueError(f"editor must be one of {', '.join(EDITORS)}, got {editor!r}")


def _source(editor: str) -> Path:
    folder = _SOURCES / editor
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the {editor} plug-in's files are not at {folder}: reinstall genfill from its source tree"
        )
    return folder


def _replace_tree(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=_IGNORE)


def _zip_tree(archive: zipfile.ZipFile, folder: Path, prefix: str) -> None:
    archive.writestr(f"{prefix}/", "")
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if "__pycache__" in relative.parts or path.suffix == ".pyc" or (folder == _BRIDGE and relative == Path("install.py")):
            continue
        name = f"{prefix}/{relative.as_posix()}"
        if path.is_dir():
            archive.writestr(f"{name}/", "")
        else:
            archive.write(path, name)
