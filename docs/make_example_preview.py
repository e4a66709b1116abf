"""Render docs/example_ct_preview.png and print the liver statistics that README's "Using the results" quotes.

Run from anywhere: ``python docs/make_example_preview.py``. It fetches the real example CT
(:mod:`tgated.data.examples`: TotalSegmentator 2.18.0's abdomen-pelvis CT from PyPI) and draws
*TotalSegmentator's own label map* of it with the code ``tgated predict --preview --statistics``
runs (:func:`tgated.inference.preview.write_preview`, :func:`tgated.inference.statistics.case_statistics`):
the tiny demo models cannot segment a real CT, and the pretrained CLIPSeg is not reachable offline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tgated.data.datasets import load_case
from tgated.data.examples import example_cases
from tgated.inference.preview import write_preview
from tgated.inference.statistics import case_statistics
from tgated.organs import ORGANS


def example_ct_statistics() -> tuple[object, object, dict]:
    """(image volume, label volume, statistics document) of the example CT and its TotalSegmentator
    label map (canonical ids)."""
    case = next(c for c in example_cases(quiet=True) if c.case_id == "example_ct")
    image, labels = load_case(case)
    assert labels is not None
    stats = case_statistics(image, labels.data, ORGANS, case_id=case.case_id, modality="ct")
    return image, labels, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("example_ct_preview.png")))
    args = parser.parse_args()
    image, labels, stats = example_ct_statistics()
    write_preview(
        args.out, image, labels.data, ORGANS, title="example_ct: TotalSegmentator's labels", modality="ct"
    )
    liver = stats["organs"]["liver"]
    print(f"wrote {args.out}")
    print(f"liver: {liver['volume_ml']:.1f} ml, mean {liver['mean']:.1f} HU (sd {liver['sd']:.1f})")
    print(json.dumps(liver, indent=2))


if __name__ == "__main__":
    main()
