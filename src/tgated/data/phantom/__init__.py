"""Synthetic abdominal CT / MR phantoms with organ labels, written in the real datasets' layouts.

The real datasets (FLARE22, BTCV, AMOS) cannot be downloaded in every environment, so training,
the demo and the tests run on phantoms: smooth, randomly deformed abdomens with all 13 canonical
organs (:data:`tgated.organs.ORGANS`), their neighbours (ribs, spine, muscles, fat, lung bases,
heart, bowel loops, colon, mesenteric and portal vessels) and plausible intensities.

Frames and units
----------------
* Patient frame (mm): ``X`` towards the patient's right, ``Y`` anterior, ``Z`` superior (RAS), with
  ``X = 0`` on the midline, ``Y = 0`` at the centre of the body outline and ``Z = 0`` near the
  L1/L2 level (renal hila). Anatomy is drawn in this frame, independently of the voxel grid, so the
  same case at another ``size`` is the same patient.
* Arrays are canonical RAS ``(x, y, z)``: the index increases towards the right, anterior and
  superior; axial slices lie along the last axis, inferior to superior. The 4×4 ``affine`` maps
  voxel indices to RAS world millimetres (the world origin is a random "table position").
* CT images are Hounsfield units (portal-venous phase); MR images are T1-weighted-like arbitrary
  units (fat bright, liver > spleen, fluid dark, smooth bias field, Rician noise): integers from 0
  to about 1300, fat ≈ 800-900.

How it is made
--------------
Every structure is a signed distance function (mm, negative inside) evaluated only inside its
bounding box: rotated ellipsoids with low-order harmonic deformations, tubes along smooth
centre-lines with varying radius (vessels, oesophagus, duodenum, bowel, colon, pancreas), per-slice
ellipses (aorta, IVC, psoas), and region functions built from the body outline and the diaphragm
domes (liver, lungs, spleen). Structures are painted in anatomical order into a tissue map and a
label map; later structures carve earlier ones, with fat planes ("halos") where real organs have
them. The tissue map becomes intensities through a per-case table (mean ± texture); thick slices
(≥ 2.5 mm) are sampled three times across their thickness and averaged (partial volume along z),
then a blur of about one voxel and noise follow. Nothing blanks or corrupts slices: single slices are
ambiguous where real CT is (pancreas vs. duodenum vs. unlabelled jejunum of the same attenuation;
the gallbladder, adrenals, kidney poles and pancreatic tail appear and vanish between slices), so
neighbouring slices help the way they do in real scans.

Everything is deterministic: case ``case`` of ``seed`` depends only on ``(seed, case, modality,
size)``; the anatomy itself only on ``(seed, case)``.

Modules
-------
:mod:`~tgated.data.phantom.tissues` (tissue classes and intensities), :mod:`~tgated.data.phantom.shapes`
(signed distance shapes), :mod:`~tgated.data.phantom.body` (body outline, diaphragm, the scene being
painted, body-frame structures), :mod:`~tgated.data.phantom.anatomy` (the organs, drawn stage by stage),
:mod:`~tgated.data.phantom.render` (grid, painting, intensities: :func:`make_phantom`) and
:mod:`~tgated.data.phantom.write` (datasets on disk: :func:`write_dataset`).
"""

from __future__ import annotations

from tgated.data.phantom.anatomy import MAX_SLICES, ORIENTATIONS, SLICE_SPACINGS_MM
from tgated.data.phantom.render import MIN_SIZE, MODALITIES, Phantom, make_phantom
from tgated.data.phantom.tissues import TISSUES
from tgated.data.phantom.write import write_dataset

__all__ = [
    "MAX_SLICES",
    "MIN_SIZE",
    "MODALITIES",
    "ORIENTATIONS",
    "SLICE_SPACINGS_MM",
    "TISSUES",
    "Phantom",
    "make_phantom",
    "write_dataset",
]
