"""Real example scans: the test data of TotalSegmentator's source distribution on PyPI.

TotalSegmentator 2.18.0's sdist (Apache-2.0) ships a few real scans under
``tests/reference_files/``. We fetch that sdist with pip (pinned version, SHA-256 checked), extract
only the scans, their segmentations and the licence into the user cache folder, and expose them as a
small dataset in canonical ids.

**Their labels are TotalSegmentator predictions, not expert annotations.** They are good for checking
I/O, orientation, intensity handling and the prediction pipeline on real anatomy; they are not a
benchmark.

===================  ====================================================================  ===========
name                 image                                                                 labels
===================  ====================================================================  ===========
example_ct           abdomen-pelvis CT, 3 mm, 122×101×112 (NIfTI, RAS)                      total
example_ct_sm        the same CT, 30 slices                                                total
example_ct_dicom     contrast CT DICOM series, 20 slices, 512², 2 mm (label's y is flipped)  total
example_mr_sm        abdominal MR, 3 mm, 20 slices (NIfTI, LPS)                             total_mr
===================  ====================================================================  ===========

Environment: ``TGATED_CACHE_DIR`` overrides the cache folder; ``TGATED_EXAMPLES_SDIST`` points to an
already downloaded ``totalsegmentator-2.18.0.tar.gz`` (still checksum-verified) for offline machines.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tgated import organs as O
from tgated.data.datasets import Case, load_case
from tgated.io.files import atomic_write_text, sha256_file
from tgated.io.volumes import write_like
from tgated.progress import on_terminal

logger = logging.getLogger(__name__)

PACKAGE = "TotalSegmentator"
VERSION = "2.18.0"
SDIST = f"totalsegmentator-{VERSION}.tar.gz"
SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
PYPI_JSON = f"https://pypi.org/pypi/{PACKAGE}/{VERSION}/json"
_PREFIX = f"totalsegmentator-{VERSION}/"
_REF = _PREFIX + "tests/reference_files/"
LABEL_NOTE = "labels are TotalSegmentator predictions, not expert annotations"


@dataclass(frozen=True)
class ExampleSpec:
    name: str
    image: str
    """File (or DICOM folder) name under tests/reference_files/."""
    label: str
    task: str
    """TotalSegmentator task of the multilabel segmentation (ids differ between tasks)."""
    modality: str
    description: str


EXAMPLES: dict[str, ExampleSpec] = {
    s.name: s
    for s in (
        ExampleSpec(
            "example_ct",
            "example_ct.nii.gz",
            "example_seg_fast_force_split.nii.gz",
            "total",
            "ct",
            "abdomen-pelvis CT, 3 mm, 112 slices",
        ),
        ExampleSpec(
            "example_ct_sm",
            "example_ct_sm.nii.gz",
            "example_seg.nii.gz",
            "total",
            "ct",
            "CT, 3 mm, 30 slices",
        ),
        ExampleSpec(
            "example_ct_dicom",
            "example_ct_dicom",
            "example_seg_dicom.nii.gz",
            "total",
            "ct",
            "contrast CT DICOM series, 20 slices, 512x512, 2 mm",
        ),
        ExampleSpec(
            "example_mr_sm",
            "example_mr_sm.nii.gz",
            "example_seg_mr.nii.gz",
            "total_mr",
            "mr",
            "abdominal MR, 20 slices",
        ),
    )
}


def cache_dir() -> Path:
    env = os.environ.get("TGATED_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tgated"))


def _wanted(member: str) -> bool:
    if member == _PREFIX + "LICENSE":
        return True
    if not member.startswith(_REF):
        return False
    rel = member[len(_REF) :]
    top = rel.split("/", 1)[0]
    return any(top in (s.image, s.label) for s in EXAMPLES.values())


def _download_sdist(dest: Path, quiet: bool) -> Path:
    """Fetch the sdist with pip (honours the user's index configuration); fall back to PyPI's JSON API."""
    target = dest / SDIST
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    if quiet:
        cmd.insert(4, "--quiet")
    elif not on_terminal():  # pip's bar would fill a log file with redraws
        cmd[4:4] = ["--progress-bar", "off"]
    logger.info("fetching the example scans: %s", " ".join(cmd[1:]))
    try:
        subprocess.run(cmd, check=True, capture_output=quiet, timeout=600)
        if target.is_file():
            return target
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        logger.warning("pip download failed (%s); trying PyPI directly", exc)
    import json

    with urllib.request.urlopen(PYPI_JSON, timeout=60) as resp:
        meta = json.load(resp)
    url = next(u["url"] for u in meta["urls"] if u["packagetype"] == "sdist")
    with urllib.request.urlopen(url, timeout=600) as resp, open(target, "wb") as fh:
        shutil.copyfileobj(resp, fh)
    return target


def fetch(root: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """Return the folder holding the example scans, downloading and extracting them on first use.

    Raises ``OSError`` with a clear message when the sdist cannot be fetched (no network), and
    ``ValueError`` when its checksum does not match the pinned one.
    """
    base = Path(root) if root is not None else cache_dir()
    out = base / "examples" / f"totalsegmentator-{VERSION}"
    marker = out / ".complete"
    if marker.is_file():
        return out
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=".examples-") as tmp:
        given = os.environ.get("TGATED_EXAMPLES_SDIST")
        if given:
            sdist = Path(given)
        else:
            try:
                sdist = _download_sdist(Path(tmp), quiet)
            except OSError as exc:
                raise OSError(
                    f"could not fetch {PACKAGE}=={VERSION} from PyPI ({exc}); the example scans need network access "
                    "once, or set TGATED_EXAMPLES_SDIST to a downloaded totalsegmentator-2.18.0.tar.gz"
                ) from None
        digest = sha256_file(sdist)
        if digest != SHA256:
            raise ValueError(
                f"{sdist}: SHA-256 {digest} does not match the pinned {SHA256}; refusing to use it"
            )
        staging = Path(tmp) / "extract"
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if _wanted(m.name) and (m.isfile() or m.isdir())]
            tar.extractall(staging, members=members, filter="data")
        src = staging / _REF
        shutil.copy2(staging / _PREFIX / "LICENSE", src / "LICENSE")
        atomic_write_text(
            src / "NOTICE.txt",
            f"Example scans from {PACKAGE} {VERSION} (sdist on PyPI, Apache-2.0, see LICENSE).\n"
            f"Their {LABEL_NOTE}.\n",
        )
        if marker.is_file():  # another process finished first
            return out
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, out)
        marker.write_text(SHA256 + "\n")
    return out


def example_cases(root: str | os.PathLike | None = None, *, quiet: bool = False) -> list[Case]:
    """The example scans as cases in canonical ids (labels: TotalSegmentator predictions)."""
    folder = fetch(root, quiet=quiet)
    cases = []
    for spec in EXAMPLES.values():
        cases.append(
            Case(
                spec.name,
                folder / spec.image,
                folder / spec.label,
                layout="totalseg",
                modality=spec.modality,
                label_map={0: 0, **O.totalseg_label_map(spec.task)},
                labelled=O.ORGAN_NAMES,
                strict_labels=False,
            )
        )
    return cases


def export_folder(
    out: str | os.PathLike, names: list[str] | None = None, *, root=None, quiet: bool = False
) -> Path:
    """Write examples in the ``folder`` layout: ``out/images/NAME.nii.gz`` and ``out/labels/NAME.nii.gz``.

    Labels are converted to canonical ids; images keep their original geometry (a DICOM series is
    written as NIfTI on the series' grid). Returns ``out``.
    """
    out_p = Path(out)
    cases = {c.case_id: c for c in example_cases(root, quiet=quiet)}
    for name in names or list(cases):
        if name not in cases:
            raise O.unknown_name("example", name, cases)
        image, label = load_case(cases[name])
        if label is None:
            raise FileNotFoundError(
                f"example {name}: label file is missing from the cache; delete the cache and retry"
            )
        write_like(out_p / "images" / f"{name}.nii.gz", image.data.astype(np.int16), image, dtype=np.int16)
        write_like(out_p / "labels" / f"{name}.nii.gz", label.data, image)
    atomic_write_text(out_p / "NOTICE.txt", f"Examples from {PACKAGE} {VERSION}; their {LABEL_NOTE}.\n")
    return out_p


__all__ = ["EXAMPLES", "LABEL_NOTE", "ExampleSpec", "example_cases", "export_folder", "fetch"]
