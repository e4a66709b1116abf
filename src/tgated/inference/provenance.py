"""``provenance.json`` of a prediction folder: the one reader and writer.

``tgated predict`` records what made each output, so that a re-run can skip finished cases and
``tgated evaluate`` / reports can tell which model made a folder's predictions::

    {
      "tool": "tgated", "version": "0.1.0",
      "model": {"path": ..., "hash": <SHA-256 of the model's config.json>, "config": {...}},
      "cases": {<case id>: {"sha256", "model_hash", "organs", "series", "modality", "input",
                            "output", "output_sha256", "probabilities", "shape", "time", ...}}
    }

Writes happen under a file lock (``.provenance.lock``), so processes predicting into the same folder
(``torchrun``) never lose each other's entries. Readers are tolerant: a missing or unreadable file
reads as empty (logged), because provenance never changes a score. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tgated import __version__
from tgated.io.files import atomic_write_json, read_json, remove_stale_temporaries

logger = logging.getLogger(__name__)

PROVENANCE_JSON = "provenance.json"
LOCK_NAME = ".provenance.lock"


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the prediction folder's lock (for ``provenance.json`` and ``labels.json`` updates).

    The lock file is opened without following a symbolic link, so a link planted in its place
    cannot make this create or lock a file outside the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(
                f"{path}: is a symbolic link; expected the lock file tgated creates there — delete the link"
            ) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(
                f"{path}: is not a regular file; expected the lock file tgated creates — delete it"
            )
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """The folder's ``provenance.json`` as a mapping; ``{}`` when missing or unreadable (logged)."""
    p = Path(folder) / PROVENANCE_JSON
    if not p.is_file():
        return {}
    try:
        data = read_json(p)
    except (OSError, ValueError) as exc:
        logger.warning(
            "%s is unreadable (%s); ignored: the cases it recorded will be predicted again", p, exc
        )
        return {}
    return data if isinstance(data, dict) else {}


def case_entries(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Case id -> that case's entry (entries that are not mappings are left out)."""
    cases = read_provenance(folder).get("cases")
    if not isinstance(cases, dict):
        return {}
    return {str(k): v for k, v in cases.items() if isinstance(v, dict)}


def model_entry(folder: str | Path) -> dict[str, str] | None:
    """``{"hash", "name", "path"}`` (those present) of the model that made the folder's predictions."""
    model = read_provenance(folder).get("model")
    if not isinstance(model, dict):
        return None
    info = {k: model[k] for k in ("hash", "name", "path") if isinstance(model.get(k), str)}
    return info or None


def record_case(folder: Path, model: dict[str, Any], case_id: str, entry: dict[str, Any]) -> None:
    """Add or replace one case's entry (and the folder's model entry), under the folder's lock."""
    with locked(folder):
        remove_stale_temporaries(folder, [PROVENANCE_JSON])
        prov = read_provenance(folder)
        prov.update({"tool": "tgated", "version": __version__, "model": model})
        cases = prov.get("cases")
        if not isinstance(cases, dict):
            cases = prov["cases"] = {}
        cases[case_id] = entry
        atomic_write_json(folder / PROVENANCE_JSON, prov)
