"""Tissue classes of the phantom label map and their Hounsfield units."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Label of one voxel of the phantom before it becomes Hounsfield units.

    The first five values are the nesting depth of the torso layers (outside, skin, fat, muscle,
    thoracic cavity), which lets the torso be labelled by counting containing layers.
    """

    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    LUNG = 4
    ABDOMEN = 5
    LIVER = 6
    STOMACH_WALL = 7
    STOMACH_CONTENT = 8
    SPLEEN = 9
    MEDIASTINAL_FAT = 10
    HEART_MUSCLE = 11
    HEART_BLOOD = 12
    HEART_FAT = 13
    CORONARY_CALCIUM = 14
    VESSEL = 15
    AIRWAY = 16
    AIRWAY_WALL = 17
    ESOPHAGUS = 18
    CORTICAL_BONE = 19
    MARROW = 20
    CARTILAGE = 21
    DISC = 22
    SPINAL_CANAL = 23
    BREAST_GLAND = 24
    TUMOUR = 25
    LUNG_VESSEL = 26
    COUCH_SHELL = 27
    COUCH_FOAM = 28
    GAS = 29


#: Everything inside the pericardium: what the true heart mask is made of.
HEART_TISSUES = frozenset(
    {Tissue.HEART_MUSCLE, Tissue.HEART_BLOOD, Tissue.HEART_FAT, Tissue.CORONARY_CALCIUM}
)
#: Not part of the patient.
OUTSIDE_TISSUES = frozenset({Tissue.AIR, Tissue.COUCH_SHELL, Tissue.COUCH_FOAM})
BONE_TISSUES = frozenset({Tissue.CORTICAL_BONE, Tissue.MARROW, Tissue.CARTILAGE, Tissue.DISC})


def lut(tissues: frozenset[Tissue] | set[Tissue]) -> np.ndarray:
    """A 256-entry boolean look-up table, True for the given tissues (index with a label array)."""
    table = np.zeros(256, dtype=bool)
    for t in tissues:
        table[int(t)] = True
    return table


def all_but(tissues: frozenset[Tissue] | set[Tissue]) -> np.ndarray:
    """A look-up table that is True for every tissue except the given ones."""
    return ~lut(tissues)


def draw_hu_table(rng: np.random.Generator) -> np.ndarray:
    """Mean HU of each tissue for one patient (float32, indexed by `Tissue`).

    Soft tissues deliberately overlap (muscle, liver, vessels, heart, tumour all lie in 35–65 HU)
    as on a non-contrast planning CT: a HU window cannot separate the heart from its neighbours.
    """
    blood = rng.uniform(40.0, 55.0)
    fat = rng.uniform(-110.0, -85.0)
    hu = np.zeros(256, dtype=np.float32)
    values = {
        Tissue.AIR: -1000.0,
        Tissue.SKIN: rng.uniform(15.0, 35.0),
        Tissue.FAT: fat,
        Tissue.MUSCLE: rng.uniform(40.0, 55.0),
        Tissue.LUNG: rng.uniform(-880.0, -820.0),
        Tissue.ABDOMEN: rng.uniform(-40.0, 0.0),
        Tissue.LIVER: rng.uniform(50.0, 66.0),
        Tissue.STOMACH_WALL: rng.uniform(35.0, 45.0),
        Tissue.STOMACH_CONTENT: rng.uniform(5.0, 25.0),
        Tissue.SPLEEN: rng.uniform(42.0, 52.0),
        Tissue.MEDIASTINAL_FAT: fat + rng.uniform(-5.0, 15.0),
        Tissue.HEART_MUSCLE: blood - rng.uniform(3.0, 10.0),
        Tissue.HEART_BLOOD: blood,
        Tissue.HEART_FAT: fat + rng.uniform(0.0, 20.0),
        Tissue.CORONARY_CALCIUM: rng.uniform(350.0, 700.0),
        Tissue.VESSEL: blood + rng.uniform(-3.0, 3.0),
        Tissue.AIRWAY: rng.uniform(-1000.0, -970.0),
        Tissue.AIRWAY_WALL: rng.uniform(20.0, 40.0),
        Tissue.ESOPHAGUS: rng.uniform(35.0, 45.0),
        Tissue.CORTICAL_BONE: rng.uniform(800.0, 1100.0),
        Tissue.MARROW: rng.uniform(250.0, 420.0),
        Tissue.CARTILAGE: rng.uniform(90.0, 160.0),
        Tissue.DISC: rng.uniform(70.0, 100.0),
        Tissue.SPINAL_CANAL: rng.uniform(15.0, 35.0),
        Tissue.BREAST_GLAND: rng.uniform(20.0, 40.0),
        Tissue.TUMOUR: rng.uniform(35.0, 50.0),
        Tissue.LUNG_VESSEL: blood,
        Tissue.COUCH_SHELL: 200.0,
        Tissue.COUCH_FOAM: -900.0,
        Tissue.GAS: -1000.0,
    }
    for tissue, value in values.items():
        hu[int(tissue)] = value
    return hu
