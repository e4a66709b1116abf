"""The phantoms' tissue classes and their intensities: CT HU range and texture, MR mean and texture.

Each case draws its CT mean uniformly in [low, high]; MR means are jittered by ±10 %
(:func:`tgated.data.phantom.render.render_intensities`). The scene's tissue map holds indices into
:data:`TISSUES`.
"""

from __future__ import annotations

import numpy as np

TISSUE_TABLE: tuple[tuple[str, float, float, float, float, float], ...] = (
    ("air", -1000, -1000, 0, 0, 0),
    ("table", 100, 250, 20, 0, 0),
    ("subcutaneous_fat", -115, -90, 8, 860, 25),
    ("muscle", 40, 60, 8, 280, 20),
    ("visceral_fat", -110, -85, 10, 800, 30),
    ("lung", -880, -820, 20, 30, 8),
    ("lung_vessel", -150, 0, 20, 60, 10),
    ("heart_blood", 140, 180, 5, 150, 20),
    ("myocardium", 90, 120, 8, 300, 20),
    ("cortical_bone", 800, 1100, 60, 25, 8),
    ("cancellous_bone", 180, 280, 40, 600, 50),
    ("bone", 450, 650, 60, 350, 40),
    ("disc", 70, 100, 8, 220, 20),
    ("csf", 5, 25, 5, 90, 10),
    ("cartilage", 110, 170, 20, 200, 20),
    ("liver", 75, 100, 5, 520, 20),
    ("hepatic_vessel", 150, 190, 5, 180, 20),
    ("spleen", 105, 125, 5, 340, 15),
    ("kidney_cortex", 160, 200, 8, 420, 20),
    ("kidney_medulla", 140, 180, 8, 300, 20),
    ("urine", 0, 20, 5, 80, 10),
    ("adrenal", 40, 60, 6, 360, 20),
    ("pancreas", 75, 100, 10, 560, 30),
    ("pancreas_fat", -70, -30, 10, 740, 30),
    ("bile", 0, 15, 4, 90, 10),
    ("gallbladder_wall", 50, 80, 6, 300, 20),
    ("gallstone", 300, 600, 40, 20, 5),
    ("stomach_wall", 70, 100, 8, 320, 20),
    ("stomach_content", 10, 40, 15, 160, 40),
    ("bowel_wall", 70, 95, 8, 320, 25),
    ("bowel_fluid", 15, 40, 8, 100, 15),
    ("stool", -60, 20, 40, 350, 80),
    ("gas", -1000, -950, 10, 5, 3),
    ("artery", 170, 230, 6, 160, 20),
    ("vein", 140, 180, 6, 200, 20),
    ("portal_vein", 160, 200, 6, 190, 20),
    ("esophagus", 35, 55, 6, 300, 20),
    ("calcification", 500, 900, 50, 20, 5),
    ("fat_strand", -20, 30, 10, 420, 30),
)
TISSUES: tuple[str, ...] = tuple(row[0] for row in TISSUE_TABLE)
"""Tissue class names; :attr:`Phantom.tissue` holds indices into this tuple."""
TISSUE = {name: i for i, name in enumerate(TISSUES)}
"""Tissue index by name."""
PROTECTED = np.zeros(len(TISSUES), dtype=bool)
"""Tissues no later structure paints over (bone, air, table, subcutaneous fat)."""
PROTECTED[[TISSUE[n] for n in ("air", "table", "subcutaneous_fat", "cortical_bone", "cancellous_bone", "bone", "disc", "csf")]] = True
KEEP = -1
"""Label value meaning "leave the label as it is" (vessels inside the liver stay liver)."""
FAT, VISCERAL_FAT, MUSCLE = TISSUE["subcutaneous_fat"], TISSUE["visceral_fat"], TISSUE["muscle"]
SOFT = (VISCERAL_FAT, TISSUE["bowel_wall"], TISSUE["bowel_fluid"], TISSUE["stool"], TISSUE["gas"], TISSUE["fat_strand"])
"""Soft tissues an organ may displace (fat, bowel, fat strands)."""
