"""Atomic file writes: a temporary file beside the target that replaces it only when complete."""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path, default: int = 0o666) -> int:
    """The permissions a plain write of ``path`` would leave: those of the file it replaces,
    else ``default`` (0o666 for files, 0o777 for folders) less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return default & ~current_umask()


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temporary path in ``path``'s folder; when the block succeeds it is renamed onto
    ``path``, when it fails it is removed. ``path`` is never left half-written. ``suffix`` ends
    the temporary name (writers that pick a format from the extension need it). The result
    has the permissions a plain write would give it (not mkstemp's 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, plain_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_writable_dir(path) -> None:
    """Create the folder ``path`` if needed and make sure files can be written in it; a
    :class:`ssbsn.errors.UserError` otherwise."""
    from .errors import UserError
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ssbsn-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{path}: output folder is not writable ({e.strerror or e})") from None
