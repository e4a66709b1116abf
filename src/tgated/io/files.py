"""Atomic file writes, checksums and safe output names: every file the tool writes goes through here.

A writer produces a temporary file in the destination folder and renames it over the target, so a
killed process leaves either the old file, the new file, or a hidden ``.NAME.tmp-*`` file that
is never mistaken for output (:func:`is_temporary`); a later run that writes ``NAME`` again removes
such leftovers first (:func:`remove_stale_temporaries`).

Folders (a saved model, its tokenizer) are replaced whole by :func:`replace_dir`.

Data staged on disk before an output is written (too large to hold in memory) goes into a
:class:`ScratchFile`, a hidden temporary next to that output, removed when done, on failure and by the
next run that writes the output.

Output names built from data (case ids, split entries, file names found in a dataset) go through
:func:`safe_name` / :func:`safe_join`, so that no value can place a file outside the output folder.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
MAX_NAME_BYTES = 255 - len(f".{TMP_MARK}") - 8 - len(".safetensors")
"""Longest output name: its temporary ``.NAME.tmp-XXXXXXXX.suffix`` must fit in 255 bytes."""
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path next to ``path``; on success it is renamed onto ``path``.

    ``suffix`` keeps extension-sensitive writers happy (nibabel needs ``.nii.gz``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}", suffix=suffix)
    except OSError as exc:
        raise _write_error(exc, target) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(exc, target) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _write_error(exc: OSError, target: Path) -> OSError:
    """``exc`` with the file being written in its message (a full disk or quota, a read-only or
    forbidden folder, a name too long); other errors unchanged."""
    if exc.errno not in DISK_ERRORS | {errno.ENAMETOOLONG}:
        return exc
    fix = {
        errno.ENOSPC: "free disk space or choose another output folder",
        errno.EDQUOT: "free space within your quota or choose another output folder",
        errno.EFBIG: "the file exceeds the size limit of this file system or process",
        errno.ENAMETOOLONG: "shorten the file name",
    }.get(exc.errno, "check the folder's permissions or choose another output folder")
    error = OSError(f"{target}: cannot be written ({exc.strerror}); {fix}")
    error.errno = exc.errno
    return error


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a leftover of an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the leftovers (``.NAME.tmp-*``, files or folders) of interrupted atomic writes of the
    targets ``names``.

    Only the temporaries of the given targets are touched, so a process never removes a file that
    another process (e.g. another rank writing other cases into the same folder) is writing.
    Returns the paths removed.
    """
    p = Path(folder)
    if not p.is_dir():
        return []
    removed = []
    for name in set(names):
        for f in p.glob(f".{glob.escape(name)}{TMP_MARK}*"):
            if not is_temporary(f):
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
            removed.append(f)
    if removed:
        logger.info("%s: removed %d leftover(s) of an interrupted run", p, len(removed))
    return sorted(removed)


def safe_name(name: str, *, what: str = "name", source: str | os.PathLike | None = None) -> str:
    """Check that ``name`` (from data: a case id, a split entry, a file name) is one plain path
    component, so that ``folder / name`` stays inside ``folder``.

    Rejected: empty names, ``.`` and ``..``, path separators (``/``, ``\\``), absolute paths, a
    leading dot (hidden files are ignored as outputs and reserved for temporaries), NUL and other
    control characters. ``what`` and ``source`` (the file the value came from) go into the error.
    """
    where = f"{source}: " if source is not None else ""
    text = str(name)
    problem = None
    if not text:
        problem = "is empty"
    elif text in (".", ".."):
        problem = "is a relative folder reference"
    elif "/" in text or "\\" in text or os.sep in text or (os.altsep and os.altsep in text):
        problem = "contains a path separator"
    elif os.path.isabs(text):
        problem = "is an absolute path"
    elif text.startswith("."):
        problem = "starts with a dot (hidden files are reserved for temporaries)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "contains control characters"
    elif len(text.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = (
            f"is {len(text.encode('utf-8', 'surrogateescape'))} bytes long, more than the {MAX_NAME_BYTES} that "
            "leave room for its temporary file's name within the file system's 255"
        )
    if problem:
        raise ValueError(
            f"{where}{what} {text!r} {problem}; expected a plain file name such as 'case_001' "
            "(letters, digits, '_', '-', '.') — rename the file or fix the entry"
        )
    return text


def safe_join(
    folder: str | os.PathLike, name: str, *, what: str = "name", source: str | os.PathLike | None = None
) -> Path:
    """``folder / name`` for a ``name`` that comes from data, guaranteed to lie inside ``folder``.

    ``name`` must pass :func:`safe_name` (one plain component: no separator, no ``..``), so the
    result's parent is ``folder`` itself. A symbolic link already at that place is replaced by an
    atomic write, never followed.
    """
    return Path(folder) / safe_name(name, what=what, source=source)


def replace_dir(target: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Write a folder through ``writer(tmp)`` into a hidden temporary next to ``target``, then swap it
    in, so that ``target`` is always either the old or the new complete folder.

    Both the new folder being written and the old one being replaced are named ``.NAME.tmp-*``, so a
    killed run's leftovers are :func:`is_temporary` and :func:`remove_stale_temporaries` removes them.
    When the writer or the swap fails, the old folder is put back and the error raised.
    """
    dest = Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{TMP_MARK}"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; give it the usual permissions
    old = None
    try:
        writer(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{TMP_MARK}old-"))
            old.rmdir()
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dest


class ScratchFile:
    """``size`` bytes staged on disk before ``target`` is written: a hidden temporary file next to it
    (``.NAME.tmp-*.suffix``), written and read at byte offsets.

    :meth:`close` removes it (call it on success and on failure; as a last resort it is also removed
    when the object is garbage-collected or the interpreter exits); a killed run's leftover is one of
    ``NAME``'s temporaries, which :func:`remove_stale_temporaries` removes. The file starts sparse, and
    the disk space it will need is checked first, so that a full disk is an error before the work
    that fills it. Reads and writes go through the file, not a memory map: the data sits in the
    kernel's page cache (reclaimable), not in the process's resident memory.
    """

    def __init__(self, target: str | os.PathLike, size: int, suffix: str = "") -> None:
        self.target = Path(target)
        self.size = int(size)
        folder = self.target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            raise _write_error(exc, self.target) from None
        if self.size > free:
            error = OSError(
                f"{self.target}: cannot be written: staging it needs {self.size / 1e9:.2f} GB of disk "
                f"space in {folder}, but {free / 1e9:.2f} GB is free; free disk space or choose another "
                "output folder"
            )
            error.errno = errno.ENOSPC
            raise error
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.target.name}{TMP_MARK}", suffix=suffix)
        except OSError as exc:
            raise _write_error(exc, self.target) from None
        self.path = Path(tmp)
        self._file = os.fdopen(fd, "r+b", buffering=0)
        self._remove = weakref.finalize(self, _remove_scratch, self._file, self.path)
        try:
            os.ftruncate(fd, self.size)
        except OSError as exc:
            self.close()
            raise _write_error(exc, self.target) from None

    def _span(self, offset: int, data) -> memoryview:
        view = memoryview(data).cast("B")
        if offset < 0 or offset + view.nbytes > self.size:
            raise ValueError(
                f"bytes {offset}..{offset + view.nbytes} lie outside the scratch file's {self.size}"
            )
        if self._file.closed:
            raise ValueError(f"{self.path}: the scratch file is closed")
        return view

    def write(self, offset: int, data) -> None:
        """Write the bytes of ``data`` (a C-contiguous buffer, e.g. a numpy array) at ``offset``."""
        view = self._span(offset, data)
        try:
            self._file.seek(offset)
            while view.nbytes:
                view = view[self._file.write(view) :]
        except OSError as exc:
            raise _write_error(exc, self.target) from None

    def read_into(self, offset: int, buffer) -> None:
        """Fill ``buffer`` (a writable C-contiguous buffer) with the bytes at ``offset``."""
        view = self._span(offset, buffer)
        self._file.seek(offset)
        while view.nbytes:
            got = self._file.readinto(view)
            if not got:
                raise OSError(f"{self.path}: ended before byte {offset + view.nbytes}; was it truncated?")
            view = view[got:]

    def close(self) -> None:
        """Remove the file (again: nothing)."""
        self._remove()

    def __enter__(self) -> ScratchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_scratch(file, path: Path) -> None:
    file.close()
    path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Checksum of a file, or of a folder's files (names and contents, sorted), e.g. a DICOM series."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{p}: JSON nested too deeply to read; expected a tgated JSON file") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or folder: the same path once symbolic links and
    ``..`` are resolved, or (both existing) the same inode, which also catches hard links and
    bind mounts."""
    pa, pb = Path(a), Path(b)
    with contextlib.suppress(OSError):
        if os.path.samefile(pa, pb):
            return True
    return pa.resolve() == pb.resolve()


def _file_keys(path: str | os.PathLike) -> list[Any]:
    """What identifies a file for :func:`same_file`: its resolved path, and its inode if it exists."""
    p = Path(path)
    keys: list[Any] = [p.resolve()]
    with contextlib.suppress(OSError):
        st = p.stat()
        keys.append((st.st_dev, st.st_ino))
    return keys


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` (symbolic links resolved) is ``folder`` or lies anywhere below it."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def check_inputs_spared(
    output: tuple[str, str | os.PathLike],
    inputs: Iterable[tuple[str, str | os.PathLike]],
    *,
    writes: Iterable[str | os.PathLike] = (),
    not_inside: Iterable[tuple[str, str | os.PathLike]] = (),
    not_containing: Iterable[tuple[str, str | os.PathLike]] = (),
) -> None:
    """Refuse, before any work, an output that would write over an input.

    ``output`` is ``(flag, path)`` of the output file or folder as the user gave it; ``inputs`` the
    ``(flag, path)`` of every input file and folder. Raises :class:`ValueError` naming both paths when

    * the output is an input (same path after resolving symbolic links, or the same inode);
    * one of the files the command will ``write`` is an input file;
    * the output lies inside one of the ``not_inside`` folders (an input whose every file is read,
      e.g. a DICOM series folder), or one of the ``not_containing`` folders lies inside the output
      (an input the command's folder writes could replace, e.g. a dataset inside a run folder).
    """
    out_flag, out = output[0], Path(output[1])
    inputs = [(flag, Path(p)) for flag, p in inputs]
    shown = f"{out_flag} {out}"
    if str(out.resolve()) != os.path.abspath(out):
        shown += f" (resolves to {out.resolve()})"
    advice = f"writing there would destroy the input — choose another {out_flag}"

    for flag, path in inputs:
        if same_file(out, path):
            kind = "folder" if path.is_dir() else "file"
            raise ValueError(f"{shown}: is the input {kind} {flag} {path}; {advice}")
    by_key: dict[Any, tuple[str, Path]] = {}
    for flag, path in inputs:
        if not path.is_dir():
            for key in _file_keys(path):
                by_key.setdefault(key, (flag, path))
    for target in writes:
        hit = next((by_key[k] for k in _file_keys(target) if k in by_key), None)
        if hit is not None:
            raise ValueError(
                f"{shown}: the output file {Path(target)} would replace the input file {hit[0]} {hit[1]}; {advice}"
            )
    for flag, path in not_inside:
        if is_within(out, path):
            raise ValueError(f"{shown}: lies inside the input folder {flag} {Path(path)}; {advice}")
    for flag, path in not_containing:
        if is_within(path, out):
            raise ValueError(
                f"{shown}: holds the input {flag} {Path(path)}, which the files written there could replace; "
                f"choose another {out_flag}"
            )
