"""The scene world's images: objects (shape × colour × size × position) drawn with Pillow,
their boxes and tags, and what a detector would report about them.

Everything is a pure function of a ``numpy.random.Generator``, so a seed fixes the world.
The "detector" is simulated: its boxes are the true boxes jittered by a few pixels, with
configurable tag noise (a wrong tag, a missed object, an extra box), and its region
feature is a fixed descriptor of the pixels inside the box (see :func:`region_feature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from cmal.data.boxes import box_iou

SHAPES = ("square", "circle", "triangle", "star", "cross", "bar")
"""The detector's class list (tags)."""
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
ATTRIBUTES = tuple(COLOURS)
"""The detector's attribute list (a colour per region, as Visual Genome detectors give)."""
SIZES = {"small": (7, 11), "large": (13, 19)}
"""Half-extent of an object in pixels, per size word."""
BACKGROUND = (128, 128, 128)
IMAGE_SIZE = 96
RAW_DIMS = 3 + 8 + 64 + 4
"""Raw descriptor: mean foreground colour, 2x2x2 colour histogram, 8x8 foreground mask,
box geometry."""


@dataclass
class Obj:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 in pixels."""

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass
class Detection:
    """What the simulated detector reports for one image."""

    boxes: np.ndarray
    """(R, 4) float32 x1, y1, x2, y2 in pixels."""
    tags: list[str]
    """One class name per region."""
    confidences: np.ndarray
    """(R,) float32 in (0, 1]."""
    attributes: list[str] = field(default_factory=list)
    """One attribute (colour) name per region."""
    source: list[int] = field(default_factory=list)
    """Index of the true object a region came from, -1 for an extra box."""


@dataclass
class NoiseConfig:
    """Tag noise of the simulated detector."""

    wrong_tag: float = 0.05
    """Probability that a region's tag is another class."""
    wrong_attribute: float = 0.05
    """Probability that a region's attribute is another colour."""
    missed: float = 0.05
    """Probability that an object gets no region."""
    extra: float = 0.1
    """Probability of one extra box with a random tag and low confidence."""
    jitter: float = 2.0
    """Std of box-corner jitter in pixels."""


def sample_objects(
    rng: np.random.Generator, min_objects: int = 2, max_objects: int = 5
) -> list[Obj]:
    """Random objects; overlaps are allowed but limited so every object stays visible."""
    objs: list[Obj] = []
    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(50):
        if len(objs) == n:
            break
        size = "small" if rng.random() < 0.5 else "large"
        r = int(rng.integers(*SIZES[size]))
        cx, cy = rng.integers(r + 1, IMAGE_SIZE - r - 1, size=2)
        box = (float(cx - r), float(cy - r), float(cx + r), float(cy + r))
        if objs and box_iou(box, [o.box for o in objs]).max() > 0.3:
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if shape == "bar":
            box = (box[0], cy - r / 3, box[2], cy + r / 3)
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        objs.append(Obj(shape, colour, size, box))
    return objs


def draw(objs: list[Obj]) -> Image.Image:
    """Render the objects, in order (later ones on top)."""
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(im)
    for o in objs:
        x1, y1, x2, y2 = o.box
        fill = COLOURS[o.colour]
        cx, cy = o.centre
        r = (x2 - x1) / 2
        if o.shape in ("square", "bar"):
            d.rectangle(o.box, fill=fill)
        elif o.shape == "circle":
            d.ellipse(o.box, fill=fill)
        elif o.shape == "triangle":
            d.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
        elif o.shape == "star":
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.45
                a = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            d.polygon(pts, fill=fill)
        elif o.shape == "cross":
            w = r / 3
            d.rectangle((x1, cy - w, x2, cy + w), fill=fill)
            d.rectangle((cx - w, y1, cx + w, y2), fill=fill)
    return im


def detect(rng: np.random.Generator, objs: list[Obj], noise: NoiseConfig) -> Detection:
    """Simulated detector output for the true objects."""
    boxes, tags, attrs, confs, source = [], [], [], [], []

    def anything(names) -> str:
        return names[int(rng.integers(len(names)))]

    for k, o in enumerate(objs):
        if rng.random() < noise.missed:
            continue
        jit = rng.normal(0, noise.jitter, 4)
        boxes.append(_clip(np.asarray(o.box) + jit))
        tag = o.shape
        if rng.random() < noise.wrong_tag:
            tag = anything(SHAPES)
        tags.append(tag)
        attrs.append(anything(ATTRIBUTES) if rng.random() < noise.wrong_attribute else o.colour)
        confs.append(float(rng.uniform(0.6, 0.99)))
        source.append(k)
    if rng.random() < noise.extra or not boxes:
        x1, y1 = rng.uniform(0, IMAGE_SIZE - 16, 2)
        w, h = rng.uniform(8, 24, 2)
        boxes.append(_clip(np.array([x1, y1, x1 + w, y1 + h])))
        tags.append(anything(SHAPES))
        attrs.append(anything(ATTRIBUTES))
        confs.append(float(rng.uniform(0.2, 0.5)))
        source.append(-1)
    return Detection(
        np.asarray(boxes, np.float32), tags, np.asarray(confs, np.float32), attrs, source
    )


def ground_truth(objs: list[Obj]) -> Detection:
    """The true boxes as regions (REC's ground-truth-box setting), confidence 1."""
    return Detection(
        np.asarray([o.box for o in objs], np.float32),
        [o.shape for o in objs],
        np.ones(len(objs), np.float32),
        [o.colour for o in objs],
        list(range(len(objs))),
    )


_PROJECTION: dict[int, np.ndarray] = {}


def projection(feature_dim: int) -> np.ndarray:
    """The fixed random projection of the feature extractor (independent of the world seed)."""
    if feature_dim not in _PROJECTION:
        g = np.random.default_rng(20221010)
        _PROJECTION[feature_dim] = (
            g.normal(size=(RAW_DIMS, feature_dim)) / math.sqrt(RAW_DIMS)
        ).astype(np.float32)
    return _PROJECTION[feature_dim]


def region_features(image: Image.Image, boxes: np.ndarray, feature_dim: int) -> np.ndarray:
    """The feature extractor: for each box, a descriptor of the pixels inside it, projected.

    Descriptor (79 numbers): mean colour of the foreground (non-background) pixels, a
    2x2x2 colour histogram of them, the 8x8 foreground mask of the box (shape), and the
    box geometry. A fixed random projection + tanh maps it to ``feature_dim``; colour and
    shape survive the projection, so the tasks are learnable from features alone.
    """
    pixels = np.asarray(image)
    raw = np.zeros((len(boxes), RAW_DIMS), np.float32)
    grid = np.arange(8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        x1i, y1i = int(max(0, math.floor(x1))), int(max(0, math.floor(y1)))
        x2i = max(int(min(IMAGE_SIZE, math.ceil(x2))), x1i + 1)
        y2i = max(int(min(IMAGE_SIZE, math.ceil(y2))), y1i + 1)
        crop = pixels[y1i:y2i, x1i:x2i]
        fg = (crop != BACKGROUND).any(axis=-1)
        colours = crop[fg].astype(np.float32) / 255.0 if fg.any() else np.zeros((1, 3), np.float32)
        raw[k, :3] = colours.mean(0)
        bins = (colours[:, 0] > 0.5) * 4 + (colours[:, 1] > 0.5) * 2 + (colours[:, 2] > 0.5)
        raw[k, 3:11] = np.bincount(bins, minlength=8) / len(colours)
        ys = grid * (fg.shape[0] - 1) // 7
        xs = grid * (fg.shape[1] - 1) // 7
        raw[k, 11:75] = fg[ys[:, None], xs[None, :]].reshape(-1)
        raw[k, 75:] = (x1 / IMAGE_SIZE, y1 / IMAGE_SIZE, x2 / IMAGE_SIZE, y2 / IMAGE_SIZE)
    return np.tanh((raw - 0.5) @ projection(feature_dim) * 2.0)


def _clip(box: np.ndarray) -> np.ndarray:
    box = np.clip(box, 0, IMAGE_SIZE)
    box[2] = max(box[2], box[0] + 1)
    box[3] = max(box[3], box[1] + 1)
    return box
