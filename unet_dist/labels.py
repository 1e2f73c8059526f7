"""The Cityscapes label table (name, id, trainId, colour), written from the published definition.

Training uses the 19 ``trainId`` classes; every other label maps to ``IGNORE`` (255), which the loss
and the metrics skip.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255


@dataclass(frozen=True)
class Label:
    name: str
    id: int
    train_id: int
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, IGNORE, (0, 0, 0)),
    Label("ego vehicle", 1, IGNORE, (0, 0, 0)),
    Label("rectification border", 2, IGNORE, (0, 0, 0)),
    Label("out of roi", 3, IGNORE, (0, 0, 0)),
    Label("static", 4, IGNORE, (0, 0, 0)),
    Label("dynamic", 5, IGNORE, (111, 74, 0)),
    Label("ground", 6, IGNORE, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, IGNORE, (250, 170, 160)),
    Label("rail track", 10, IGNORE, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, IGNORE, (180, 165, 180)),
    Label("bridge", 15, IGNORE, (150, 100, 100)),
    Label("tunnel", 16, IGNORE, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, IGNORE, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, IGNORE, (0, 0, 90)),
    Label("trailer", 30, IGNORE, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
)

TRAIN_LABELS: tuple[Label, ...] = tuple(
    sorted((lab for lab in LABELS if lab.train_id != IGNORE), key=lambda lab: lab.train_id)
)
NUM_CLASSES = len(TRAIN_LABELS)  # 19
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in TRAIN_LABELS)
BY_NAME: dict[str, Label] = {lab.name: lab for lab in LABELS}


def palette_colors() -> tuple[np.ndarray, np.ndarray]:
    """The distinct palette colours (29) and, for each, its trainId.

    A colour shared by several labels (black, pole/polegroup grey) takes the trainId of the label
    that has one, so pole grey names the pole class.
    """
    best: dict[tuple[int, int, int], int] = {}
    for lab in LABELS:
        if lab.color not in best or best[lab.color] == IGNORE:
            best[lab.color] = lab.train_id
    colors = np.array(list(best.keys()), dtype=np.uint8)
    train_ids = np.array(list(best.values()), dtype=np.uint8)
    return colors, train_ids


def id_to_train_id_lut() -> np.ndarray:
    """A 256-entry table mapping Cityscapes ``labelIds`` values to trainIds (unknown ids -> 255)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for lab in LABELS:
        lut[lab.id] = lab.train_id
    return lut


def train_id_to_id_lut() -> np.ndarray:
    """A 256-entry table mapping trainIds back to Cityscapes ``labelIds`` (the benchmark's submission
    format); 255 (ignore) and unknown values map to 0, ``unlabeled``."""
    lut = np.zeros(256, dtype=np.uint8)
    for lab in TRAIN_LABELS:
        lut[lab.train_id] = lab.id
    return lut


def train_id_palette() -> np.ndarray:
    """A (256, 3) uint8 colour table indexed by trainId; 255 (ignore) is black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for lab in TRAIN_LABELS:
        pal[lab.train_id] = lab.color
    return pal


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Paint a (H, W) trainId map in the Cityscapes palette: (H, W, 3) uint8."""
    return train_id_palette()[train_ids]
