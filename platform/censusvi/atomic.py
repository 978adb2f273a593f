"""Outputs: built under a temporary name, then swapped into place; never half-written, and never
replacing what censusvi did not write.

What an output may replace is ``censusvi.artifacts``'s (``check_replaceable``); nothing replaces
one of the command's own inputs (``check_output``).

The swap is two renames: the old output to ``.NAME.old-PID-X``, then the new one (built at
``.NAME.tmp-PID-X``) to ``NAME``. A run killed between them leaves the old one aside and no
``NAME``; the next write to ``NAME`` (``recover``) first puts it back, and removes temporaries of
dead processes. Files are flushed (fsync) before the rename, and the directory after it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from censusvi.artifacts import (
    DIR_KINDS,
    FILE_KINDS,
    MARKER,
    OutputRefused,
    check_replaceable,
    describe,
)

log = logging.getLogger(__name__)


def check_output(
    out: str | os.PathLike,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "--out",
) -> None:
    """Before any work: refuse an ``out`` that is (or holds) one of ``inputs`` or the current
    directory, repair a killed swap at ``out``, ``check_replaceable``, and refuse a file
    ``out`` whose suffix is not its ``kind``'s; ``flag`` names it in the errors."""
    out = _target(out, flag)
    _check_not_input(out, inputs, flag)
    _check_writable(out, flag)
    recover(out)
    check_replaceable(out, kind, overwrite, flag)
    if kind in FILE_KINDS and out.suffix.lower() != kind:
        raise OutputRefused(
            f"{flag} {out}: this command writes a {kind} file; give a name ending in {kind} "
            f"(e.g. {out.with_suffix(kind).name})"
        )


def check_folder(
    out: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike | None] = ()
) -> None:
    """Before any work: a folder the command adds files to (``flag``, e.g. --png-dir) is not
    one of ``inputs`` nor inside an input directory, is not a file, and can be written (it
    may hold other files, the inputs among them: nothing in it is replaced but its own)."""
    out = _target(out, flag)
    target = resolved(out)
    for given, p in _local(inputs):
        if p == target or (p.is_dir() and p in target.parents):
            raise OutputRefused(
                f"{flag} {out} {'is' if p == target else 'is inside'} the input {given}; "
                f"writing there would change that input: choose another {flag}"
            )
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{flag} {out} is {describe(out)}, not a folder: choose another {flag}")
    _check_writable(out / "file" if out.is_dir() else out, flag)  # in the folder itself


def resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with links followed; a link loop is one line (Python 3.11's
    pathlib raises RuntimeError for it, later ones OSError)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        raise ValueError(
            f"{path}: cannot follow its symbolic links ({e}): name the file itself"
        ) from None


def _local(inputs) -> Iterator[tuple[str | os.PathLike, Path]]:
    """(as given, resolved) for each input that is a local path or a file:// URI (not another
    scheme's URI, not models:/)."""
    for given in inputs:
        if not given or str(given).startswith("models:/"):
            continue
        scheme = uri_scheme(given)
        if scheme is None:
            yield given, resolved(given)
        elif scheme == "file":  # an output may be written inside it: compare its path
            try:
                yield given, resolved(file_uri_path(given, "input"))
            except OutputRefused:
                continue  # not a local file: the command's reader says so


def _check_not_input(out: Path, inputs, flag: str = "--out") -> None:
    here = Path.cwd().resolve()
    target = resolved(out)
    for given, p in _local([*inputs, here]):
        if p == target or target in p.parents:
            what = "the current directory" if given is here else f"the input {given}"
            raise OutputRefused(
                f"{flag} {out} {'is' if p == target else 'holds'} {what}; replacing it would "
                f"delete it, even with --overwrite: choose another {flag}"
            )
        if given is not here and p.is_dir() and p in target.parents:
            raise OutputRefused(
                f"{flag} {out} is inside the input {given}; writing there would change that "
                "input (a model or index directory holds only what censusvi wrote): choose "
                f"another {flag}"
            )


def _check_writable(out: Path, flag: str = "--out") -> None:
    """Refuse an ``out`` whose folder cannot be written (tried with a scratch file in its
    nearest existing folder), or that would go under a file, before any work."""
    import tempfile

    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputRefused(
            f"{flag} {out}: {parent} is a file, not a folder: choose another {flag}"
        )
    try:
        fd, scratch = tempfile.mkstemp(prefix=".censusvi-probe-", dir=parent)
    except OSError as e:
        raise OutputRefused(
            f"{flag} {out}: cannot write in {parent} ({e.strerror}): choose a folder you can write"
        ) from None
    os.close(fd)
    os.unlink(scratch)


def uri_scheme(value: str | os.PathLike) -> str | None:
    """The scheme of a URI (``file``, ``s3``, ...); None for a local path ('runs/a://b' is
    one, and so is a Windows drive, 'C:/x')."""
    scheme, sep, _ = str(value).partition("://")
    return scheme.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+", scheme) else None


def file_uri_path(value: str | os.PathLike, flag: str) -> str:
    """The local path a ``file://`` URI names; one on another host, or with a query or a
    fragment, is refused (``flag`` names the option)."""
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    parts = urlsplit(str(value))
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise OutputRefused(
            f"{flag} {value}: a file URI names a path on this machine, file:///PATH (no host, "
            "query or fragment)"
        )
    return url2pathname(parts.path)


def local_output(out: str | os.PathLike | None, flag: str = "--out") -> str | os.PathLike | None:
    """An output the command line writes, as a local path: a ``file://`` URI becomes its path
    (it was written to ./file:/... under the current directory); another scheme is refused,
    since the commands write local files."""
    scheme = None if out is None else uri_scheme(out)
    if scheme is None:
        return out
    if scheme == "file":
        return file_uri_path(out, flag)
    raise OutputRefused(
        f"{flag} {out}: the command line writes local files; give a path here, then copy the "
        "output where it should go"
    )


def _target(out: str | os.PathLike, flag: str = "--out") -> Path:
    if not os.fspath(out).strip():  # Path("") is the current directory
        raise OutputRefused(f"{flag} is empty: give the path to write")
    out = Path(out)
    if out.name in ("", ".", ".."):
        out = out.resolve()
    if not out.name:
        raise OutputRefused(f"{flag} {out} is the file system's root: choose another {flag}")
    return out


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs here (its leftovers may be a write in progress, or a
    running replica's files)."""
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill(pid, 0) kills
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # no such pid can exist
        return False
    return True


def _leftovers(out: Path, what: str) -> list[Path]:
    """``.NAME.{what}-PID[-X][.suffix]`` beside ``out`` of processes that no longer run."""
    pattern = re.compile(re.escape(f".{out.name}.{what}-") + r"(\d+)(?:-[0-9a-f]+)?(?:\.\w+)?")
    found = []
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m and not process_alive(int(m.group(1))):
            found.append(p)
    return found


def recover(out: str | os.PathLike) -> None:
    """Undo what a killed write left at ``out``: no ``NAME`` but an old one set aside -> put it
    back; then remove other set-aside and temporary copies of dead processes."""
    out = Path(out)
    olds = _leftovers(out, "old")
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda p: p.lstat().st_mtime_ns)
        os.rename(newest, out)
        _fsync_dir(out.parent)
        olds.remove(newest)
        log.warning("%s: restored from %s, left by an interrupted write", out, newest.name)
    for p in olds + _leftovers(out, "tmp"):
        log.warning("removing %s, left by an interrupted write of %s", p, out)
        _remove(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike) -> None:
    if os.name == "posix":  # elsewhere directories cannot be opened for fsync
        _fsync(path)


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (or ``path`` itself) and the directories holding them,
    so a crash after the rename cannot leave a renamed but empty file."""
    files = [path] if path.is_file() else []
    dirs = []
    for root, _, names in os.walk(path):
        dirs.append(root)
        files.extend(Path(root) / n for n in names)
    for f in files:
        if not f.is_symlink():
            _fsync(f)
    for d in dirs:
        _fsync_dir(d)


def _widen_modes(path: Path, umask: int) -> None:
    """Give ``path`` (and what it holds) the modes the umask allows: some writers create
    owner-only files (safetensors: 0o600) that others reading the output could not open."""
    entries = [(path, path.is_dir())]
    for root, dirs, names in os.walk(path):
        entries += [(Path(root) / n, True) for n in dirs]
        entries += [(Path(root) / n, False) for n in names]
    for p, is_dir in entries:
        if not p.is_symlink():
            mode = p.stat().st_mode & 0o7777
            os.chmod(p, (mode | (0o777 if is_dir else 0o666)) & ~umask)


def _temp(out: Path, what: str, suffix: str = "") -> Path:
    return out.with_name(f".{out.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, setting an existing ``out`` aside first and removing it last."""
    _fsync_tree(tmp)
    old = None
    if os.path.lexists(out):
        old = _temp(out, "old")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        _remove(old)


@contextmanager
def atomic_directory(out: str | os.PathLike, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; on success it replaces ``out``, on error it vanishes.

    ``kind`` names what is written (a ``DIR_KINDS`` key): ``out`` may already be one, or empty;
    anything else is replaced only with ``overwrite``.
    """
    out = _target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    check_replaceable(out, kind, overwrite)  # before the work, not only after it
    tmp = _temp(out, "tmp")
    os.mkdir(tmp)  # mode 0o777 less the umask (tempfile.mkdtemp's is 0o700)
    try:
        umask = 0o777 & ~tmp.stat().st_mode  # read back: os.umask() would change it meanwhile
        yield tmp
        if MARKER in DIR_KINDS[kind][0]:
            (tmp / MARKER).write_text(json.dumps({"kind": kind}))
        _widen_modes(tmp, umask)
        check_replaceable(out, kind, overwrite)  # it may have appeared meanwhile
        _swap_in(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(
    out: str | os.PathLike,
    write: Callable[[Path], object],
    suffix: str = "",
    overwrite: bool = False,
) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``out``, then swap it in as ``out``.

    ``suffix`` (".h5ad", ".csv", ".html") is the temporary's and the kind (``FILE_KINDS``) that
    ``out`` may already be; anything else is replaced only with ``overwrite``.
    """
    out = _target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    check_replaceable(out, suffix, overwrite)
    tmp = _temp(out, "tmp", suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        umask = 0o666 & ~tmp.stat().st_mode
        write(tmp)
        _widen_modes(tmp, umask)
        check_replaceable(out, suffix, overwrite)
        _swap_in(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out
