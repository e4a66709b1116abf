"""The evaluation protocols: their names and what each does, read by ``tgated evaluate``'s choices.

The scoring itself is :func:`tgated.metrics.case_scores` (the one dispatch over these names); the
conventions are documented in :mod:`tgated.metrics`. This module is plain data (no numpy), so the
CLI can read it for ``--help``.
"""

from __future__ import annotations

PROTOCOLS: dict[str, str] = {
    "native": "organs the dataset labels, at native resolution; both empty: excluded (default)",
    "flare22": "the official FLARE22 evaluation script (both empty: 1; aorta, IVC, esophagus z-cropped)",
    "paper": "Dice on the 352x352 model grid, as the reference T-Gated code scored it",
}
PROTOCOL_NAMES: tuple[str, ...] = tuple(PROTOCOLS)
DEFAULT_PROTOCOL = PROTOCOL_NAMES[0]
FILE_AXES_PROTOCOLS: tuple[str, ...] = (PROTOCOL_NAMES[1],)
"""Protocols that score label maps in the ground-truth file's own array axes and header spacing (the
FLARE22 script crops along the file's third axis); the others take the canonical frame."""


def check_protocol(protocol: str) -> str:
    """``protocol`` when it is one of :data:`PROTOCOLS`, else a ValueError listing them."""
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown evaluation protocol {protocol!r}; expected one of: {', '.join(PROTOCOL_NAMES)}"
        )
    return protocol
