"""Atomic file and directory writes, and the rules every stage follows for its ``--out`` directory.

Readers never see half-written output:

- :func:`atomic_write_text` / :func:`atomic_write_json` write a temporary sibling file and rename it;
- :func:`atomic_directory` yields a temporary sibling directory; on success the old directory (if
  any) is renamed aside, the new one renamed into place, and only then is the old one removed. An
  exception (Ctrl-C included) leaves the old directory as it was; a kill leaves either the old
  complete result, or (between the two renames) nothing at ``final`` and the old result in a hidden
  sibling that :func:`output_lock` puts back on the next run.

A stage's run (:func:`output_lock`) first checks ``--out`` (:func:`validate_out`: not a file, writable,
not someone else's directory), then holds an exclusive lock (``fcntl.flock`` on ``.<name>.lock`` in
the parent directory) for its whole duration, so a second run into the same ``--out`` fails at once.
Everything written gets ordinary permissions (``0666``/``0777`` less the umask: ``0644``/``0755``
usually), although the temporary files and directories are created ``0600``/``0700``.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputError

#: entries of an output directory that are run state, not a result (kept across runs of a stage)
TRANSIENT = ("checkpoints",)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of an ordinary new file (``0644`` under the usual umask)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of an ordinary new directory (``0755`` under the usual umask)."""
    return 0o777 & ~_umask()


def ordinary_permissions(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything below it ordinary permissions (:func:`file_mode`, :func:`dir_mode`)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for top, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, dmode)
        for name in files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, fmode)


def _real(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, with ``~`` expanded and, if it is a symbolic link, the directory it points to."""
    path = Path(path).expanduser()
    return path.resolve() if path.is_symlink() else Path(os.path.abspath(path))


def _stale_siblings(final: Path) -> tuple[list[Path], list[Path]]:
    """Hidden leftovers of an interrupted :func:`atomic_directory`: (temporary dirs, moved-aside old dirs)."""
    parent = final.parent
    if not parent.is_dir():
        return [], []
    tmp = sorted(parent.glob(f".{final.name}.tmp-*"))
    old = sorted(parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    return tmp, old


def clean_stale(final: str | os.PathLike[str]) -> None:
    """Remove what an interrupted :func:`atomic_directory` left beside ``final``; call it under
    :func:`output_lock`. If ``final`` itself is missing (killed between the two renames), the
    moved-aside old result is complete, and it is put back."""
    final = _real(final)
    tmp, old = _stale_siblings(final)
    for path in tmp:
        shutil.rmtree(path, ignore_errors=True)
    if old and not final.exists():
        os.replace(old.pop(), final)
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str], *, overwrite: bool = True,
                     carry: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` as a whole.

    ``final`` is renamed aside, the new directory renamed into place, then the old one removed
    (nothing of the old directory survives next to the new one, e.g. the shards of an earlier
    sharded model). ``carry`` names entries of the old directory (``checkpoints``) that move into
    the new one instead. On an exception the temporary directory is removed and ``final`` is left
    as it was. ``final`` must not be a file.
    """
    final = _real(final)
    if final.exists() and not final.is_dir():
        raise ConfigError(f"{final} is a file, not a directory; choose another path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    carried: list[str] = []
    try:
        yield tmp
        ordinary_permissions(tmp)  # mkdtemp makes 0700; some writers (safetensors via a temp file) 0600
        if final.exists():
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "exists", str(final))
            for name in carry:
                src = final / name
                if src.exists() or src.is_symlink():
                    if (tmp / name).exists():
                        raise FileExistsError(errno.EEXIST, "the new result already holds it", str(tmp / name))
                    os.replace(src, tmp / name)
                    carried.append(name)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.exists() and final.is_dir():  # not swapped: give the carried entries back
            for name in carried:
                with contextlib.suppress(OSError):
                    os.replace(tmp / name, final / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- the --out directory of a stage ------------------------------------------------------------------
def validate_out(path: str | os.PathLike[str] | None, *, owner_files: Iterable[str] | None = None,
                 transient: Iterable[str] = TRANSIENT, flag: str = "--out") -> Path:
    """Check an output directory before any work; return it as a :class:`~pathlib.Path` (``~`` expanded).

    Refused with one line (:class:`~lorashear.errors.OutputError`): no path, a path that is a
    file or lies under one, a directory (or the nearest existing parent) that is not writable,
    and, when ``owner_files`` is given, an existing non-empty directory that holds none of those
    files, only other things than ``transient`` run state: the stage replaces its output
    directory as a whole, so it must not take over a directory it did not write (nor the current
    directory or one above it).
    """
    if path is None or not str(path).strip():
        raise OutputError(f"an output directory is required ({flag} DIR)")
    given = Path(path).expanduser()
    out = _real(path)
    here = Path(os.path.abspath(os.getcwd()))
    if owner_files is not None and (out == here or out in here.parents):
        raise OutputError(f"{flag} {path} is the current directory or one above it, which the result would replace; "
                          f"give a subdirectory such as {flag} runs/out")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{flag} {out} is a file; give a directory (it is created if missing)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {out} is not writable; choose another {flag}")
        if owner_files is not None:
            owners = set(owner_files)
            keep = set(transient)
            entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            if entries and not owners & set(entries):
                foreign = [e for e in entries if e not in keep]
                if foreign:
                    raise OutputError(
                        f"{flag} {out} already holds other files ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}) and the result replaces the whole directory; "
                        f"choose a new or empty {flag}")
    _check_creatable(out, flag)
    return given


def _check_creatable(out: Path, flag: str) -> None:
    """Refuse ``out`` when its nearest existing parent is a file or is not writable."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        where = "its parent " if parent == out.parent else ""
        raise OutputError(f"{flag} {out} cannot be written: {where}{parent} is not writable; choose another {flag}")


def validate_out_file(path: str | os.PathLike[str] | None, *, flag: str = "--out") -> Path:
    """Check an output *file* before any work (a stage that writes one file, e.g. a GGUF export); return it
    (``~`` expanded). Refused with one line: no path, a directory, a file that is not writable, and a path
    whose directory cannot be created or written (under a regular file, read-only)."""
    if path is None or not str(path).strip():
        raise OutputError(f"an output file is required ({flag} FILE)")
    given = Path(path).expanduser()
    out = _real(path)
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a directory; name the file to write")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"{flag} {out} is not writable; choose another {flag}")
    _check_creatable(out, flag)
    return given


def lock_path(final: str | os.PathLike[str]) -> Path:
    """The lock file of an output directory: ``.<name>.lock`` beside it."""
    final = _real(final)
    return final.parent / f".{final.name}.lock"


#: run trees this context holds (``output_lock(..., tree=True)``): its stages may lock directories inside them
_OWN_TREES: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("lorashear_own_trees", default=())


def _holder(lock: Path) -> str | None:
    """``""`` or the holder's process id when another open file holds ``lock`` locked; ``None`` when free."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return text if text.isdigit() else ""
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _who(holder: str) -> str:
    return f" (process {holder})" if holder else ""


def _check_enclosing_runs(final: Path) -> None:
    """Refuse ``final`` when a directory above it is locked by another run (a stage's ``--out`` inside a
    running ``lorashear run``'s directory, whose stages would replace it); this context's own run tree is
    no obstacle."""
    own = _OWN_TREES.get()
    for parent in final.parents:
        if parent in own:
            return
        holder = _holder(lock_path(parent)) if parent != parent.parent else None
        if holder is not None:
            raise OutputError(f"{final} lies inside {parent}, which another lorashear run{_who(holder)} is writing; "
                              "wait for it to finish or choose an --out outside it")


def _check_enclosed_runs(final: Path) -> None:
    """Refuse a run tree ``final`` while another run writes a directory inside it (its lock file is there)."""
    for lock in sorted(final.glob(".*.lock")) if final.is_dir() else []:
        holder = _holder(lock)
        if holder is not None:
            inner = final / lock.name[1:-len(".lock")]
            raise OutputError(f"another lorashear run{_who(holder)} is writing {inner}, inside {final}; wait for it "
                              "to finish or choose another --out")


@contextlib.contextmanager
def output_lock(final: str | os.PathLike[str], *, enabled: bool = True, tree: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on the output directory ``final`` (created parents included) for the
    duration; a second holder fails at once with one line, and so does a directory inside one that
    another run has locked. Leftovers of an interrupted earlier run are cleaned up first
    (:func:`clean_stale`). The lock file is removed on exit; parent directories created here are
    removed again if nothing was written into them.

    ``tree=True`` locks a whole run tree (``lorashear run``): it is refused while another run writes a
    directory inside it, and while it is held, stages of this context may lock directories inside it
    but no other run may. ``enabled=False`` (processes other than the main one of a multi-process run)
    does nothing.
    """
    import fcntl

    final = _real(final)
    if not enabled:
        yield final
        return
    _check_enclosing_runs(final)
    created: list[Path] = []
    parent = final.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(final)
    try:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 32).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
                raise OutputError(f"another lorashear run{_who(holder if holder.isdigit() else '')} is writing "
                                  f"{final}; wait for it to finish or choose another --out") from None
            # the previous holder may have removed the file between our open and flock: retry on a fresh one
            try:
                st, cur = os.fstat(fd), os.stat(lock)
                same = (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        token = None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            if tree:
                _check_enclosed_runs(final)
                token = _OWN_TREES.set((*_OWN_TREES.get(), final))
            clean_stale(final)
            yield final
        finally:
            if token is not None:
                _OWN_TREES.reset(token)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)
    finally:
        for path in created:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()
