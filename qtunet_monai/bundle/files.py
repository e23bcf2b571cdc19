# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Files written so that a killed run, a full disk or two runs at once never leave a broken one.

Every file is written to a temporary name beside its target and renamed over it (atomic on POSIX).
The temporary name carries the host and process id of the writer, so that a later run can remove
the temporaries of killed writers and leave those of live ones alone.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
from pathlib import Path

from monai.data import NibabelWriter, PILWriter

from .errors import OutputError, SettingError

__all__ = ["temporary_path", "replace_atomically", "atomic_write_text", "clean_stale_temporaries", "check_writable",
           "AtomicNibabelWriter", "AtomicPILWriter", "resolve_inside"]

logger = logging.getLogger(__name__)

# .<target name>.<host>.<pid>.<mkstemp's random part>.tmp[<target's extension>]
_TEMPORARY = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp(\.[A-Za-z0-9.]+)?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _extension(name: str) -> str:
    """``.nii.gz``, ``.png``, ...: the part of the name a writer looks at to choose the format."""
    suffixes = Path(name).suffixes
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def temporary_path(path: str | os.PathLike, keep_extension: bool = False) -> Path:
    """Create (empty, mode 0600) and return a temporary file beside ``path`` named after this host and process.

    Args:
        path: the file that will replace it.
        keep_extension: end the name with ``path``'s extension, for writers that choose the format by it.
    """
    path = Path(path)
    suffix = ".tmp" + (_extension(path.name) if keep_extension else "")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def replace_atomically(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush ``tmp`` to disk, give it the permissions of a normally created file and rename it over ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary beside it: a killed write leaves the old file whole."""
    tmp = temporary_path(path)
    try:
        Path(tmp).write_text(text)
        replace_atomically(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder``; returns those removed.

    Only names this package writes are touched, and of those only the ones written on this host by a
    process that no longer exists (a live run's temporary is kept).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, host = [], _host()
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        stale = bool(match) and match["host"] == host and int(match["pid"]) != os.getpid() \
            and not _alive(int(match["pid"]))
        if stale and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        logger.info(f"removed {len(removed)} temporary file(s) of killed runs from {folder}: "
                    f"{[p.name for p in removed]}")
    return removed


def check_writable(*folders: str | os.PathLike) -> None:
    """Create each folder if needed and write (and remove) a small file in it, so that a read-only or
    unusable checkpoint or output folder stops the run at start-up instead of after an epoch.

    Raises:
        OutputError: naming the folder and why it cannot be written.
    """
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(folder / ".write_test")
            tmp.unlink()
        except OSError as e:
            raise OutputError(f"{folder}: cannot write to this folder ({e.strerror or e}); "
                              "choose another one or fix its permissions.") from e


class _AtomicWrite:
    """Mixin for MONAI's image writers: write to a temporary beside the file, then rename it over the file."""

    def write(self, filename, verbose: bool = False, **kwargs):
        path = Path(filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path, keep_extension=True)
        try:
            super().write(str(tmp), verbose=verbose, **kwargs)
            replace_atomically(tmp, path)
        except OSError as e:
            raise OutputError(f"{path}: could not be written ({e.strerror or e}).") from e
        finally:
            tmp.unlink(missing_ok=True)


class AtomicNibabelWriter(_AtomicWrite, NibabelWriter):
    """MONAI's ``NibabelWriter`` writing atomically: concurrent or killed writers never leave a truncated file."""


class AtomicPILWriter(_AtomicWrite, PILWriter):
    """MONAI's ``PILWriter`` writing atomically."""


def resolve_inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """``relative`` resolved inside the folder ``root``; a path that escapes it (``..``, an absolute path
    elsewhere, a link out) is refused, so a name from a client or a config cannot reach other files.

    Raises:
        SettingError: naming the path and the folder.
    """
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise SettingError(f"{str(relative)!r} points outside {root}; give a path inside that folder.")
    return path

