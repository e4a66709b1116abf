"""Training checkpoints: ``RUN/checkpoints/last.pt`` for exact resume, without pickle.

The file is ``torch.save`` of ``{"format", "version", "sha256", "state"}`` where ``state`` holds only
tensors, numbers, strings, lists and dicts (random-number-generator states are stored as tensors and
lists), so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``. ``sha256`` is a
digest of the whole state (keys, numbers and tensor bytes), recomputed on load: a truncated or
modified file is an error naming it. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tgated.io.files import atomic_path

FORMAT = "tgated-train-checkpoint"
VERSION = 1


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(f"K{key!r}".encode())
            _digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _digest(item, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())
    else:
        raise TypeError(
            f"checkpoint state holds a {type(obj).__name__}; only tensors and plain values are stored"
        )


def state_digest(state: Any) -> str:
    """SHA-256 of a checkpoint state (keys, plain values and tensor bytes)."""
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain values only) atomically to ``path``."""
    target = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "sha256": state_digest(state), "state": state}
    with atomic_path(target, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return target


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU) and verify its digest."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint does not exist")
    fix = "restore the file, or delete it (and the run folder) to train from the start"
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on damaged files
        if "Unsupported global" in str(exc) or "can still be loaded" in str(exc):
            # torch's message advises weights_only=False, which would run the code a pickle can hold
            raise ValueError(
                f"{p}: holds pickled Python objects besides tensors and plain values, so it is not a tgated "
                f"checkpoint (which never does) and is not unpickled, since that could run code — {fix}"
            ) from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc):  # never quote torch's advice to load unsafely
            first = "damaged data or not a torch file"
        raise ValueError(
            f"{p}: not a readable checkpoint ({first[:200]}); it is truncated or corrupted — {fix}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state" not in payload:
        raise ValueError(f"{p}: not a tgated training checkpoint (expected format {FORMAT!r}) — {fix}")
    if int(payload.get("version", 0)) > VERSION:
        raise ValueError(
            f"{p}: checkpoint version {payload.get('version')} is newer than this tgated reads ({VERSION}); upgrade tgated"
        )
    state = payload["state"]
    if state_digest(state) != payload.get("sha256"):
        raise ValueError(
            f"{p}: checkpoint contents do not match their recorded SHA-256 (the file was modified) — {fix}"
        )
    return state


# ---------------------------------------------------------------------------------------------
# random number generators
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch generator states as tensors and plain values."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
