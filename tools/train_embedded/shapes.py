"""Procedural "shapes" scenes: training data and an automatic checker for diffserve's embedded models.

The embedded default models are trained on tiny synthetic scenes -- one coloured shape on a plain
background -- and judged by :func:`check_image` / :func:`check_video` on prompts whose
(colour, shape, position) combination never occurred in training (:func:`heldout_triples`; videos:
(colour, shape, motion), :func:`heldout_motion_triples`). Numpy and PIL only, deterministic
given a ``numpy.random.Generator``. Run ``python -m tools.train_embedded.shapes OUT_DIR`` for sample sheets.

It lives beside the trainers, outside the ``diffserve`` package: the runtime never uses it; the trainers and
the tests of the shapes data and of the shipped models import it from here (run from the repository root).

Caption grammar (the size word is always present, so the article is always "a"):

* image: ``a {size} {color} {shape} in the {position} on a {background} background``,
  e.g. "a large red circle in the top left on a white background", "a small blue square in the center
  on a gray background".
* video: ``a {size} {color} {shape} moving {to the left|to the right|up|down} on a {background}
  background``, e.g. "a large blue square moving to the right on a black background". The start area
  (``Scene.position``) is not in the caption; it is always the side opposite the motion (see
  :data:`VIDEO_STARTS`), and the shape travels 38-48% of the frame, fully inside it.

Geometry (fractions of the frame, y down): a shape's area centroid sits at its position's anchor
(0.25 / 0.75 per axis, 0.5 for "center"), jittered by up to +-0.05 when an rng is given, then shifted
just enough to keep the shape inside the frame. "small" / "large" circles and squares span 25% / 40% of
the frame (+-8% with an rng); triangles point up, base = height = 1.1x that.

Checker (:func:`check_image`, uint8 RGB or floats in 0-255, or 0-1 if the maximum is <= 1; frames under
64 px are first upsampled bilinearly): smooth ([1, 2, 1]), give every pixel with chroma (max - min channel) >= 40
the palette colour of nearest hue -- white, black and gray backgrounds drop out --, keep the asked
colour's pixels at least half as saturated as its typical pixel (the 50% contour of a blurred shape),
open 3x3, take the largest 8-connected component. Colour: 0.6-30% of the frame and no other colour
has a larger component. Position: the region of the centroid ("center" within 0.125 of the middle on
both axes, else the quadrant). Shape: nearest clean-render prototype in moment features (4-fold
anisotropy, skewness, elongation; see :func:`_shape_features`) within distance 0.3.
:func:`check_video` tracks the component per frame (see its docstring).
"""

from __future__ import annotations

import argparse
import functools
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 40),  # hue 357
    "green": (20, 185, 45),  # hue 129
    "blue": (30, 75, 235),  # hue 227
    "yellow": (250, 230, 0),  # hue 55
    "orange": (255, 120, 0),  # hue 28
    "purple": (160, 45, 220),  # hue 279
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0),
                                                "gray": (128, 128, 128)}  # fmt: skip
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES: tuple[str, ...] = ("small", "large")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

#: Start areas of a video for each motion: the side opposite the motion, so the whole path fits.
VIDEO_STARTS: dict[str, tuple[str, str]] = {
    "right": ("top left", "bottom left"),
    "left": ("top right", "bottom right"),
    "down": ("top left", "top right"),
    "up": ("bottom left", "bottom right"),
}
_ANCHORS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
            "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}  # fmt: skip
_UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_MOTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_EXTENT = {"small": 0.25, "large": 0.40}
_TRIANGLE_SCALE = 1.1
_JITTER, _SIZE_JITTER, _MARGIN = 0.05, 0.08, 0.02
_TRAVEL = (0.38, 0.48)  # video travel, fraction of the frame (nominal: the mean)
_SUPERSAMPLE = 4

_ANALYSIS_SIZE = 64  # smaller frames are upsampled to at least this before segmentation
_CHROMA_FLOOR = 40.0  # below this max - min channel difference a pixel is background
_MIN_AREA, _MAX_AREA = 0.006, 0.30  # component area, fraction of the frame
_CENTER_RADIUS = 0.125
_SHAPE_TOL = 0.3  # max feature distance to the nearest prototype
_MIN_TRAVEL, _MAX_DRIFT, _MIN_MONOTONIC, _MIN_TRACKED = 0.2, 0.5, 0.7, 0.75


@dataclass(frozen=True)
class Scene:
    """One scene: a ``color`` ``shape`` of ``size`` at ``position`` (a video's start area) on ``background``;
    ``motion`` (one of DIRECTIONS) makes it a video scene."""

    shape: str
    color: str
    position: str
    background: str = "white"
    size: str = "large"
    motion: str | None = None

    def __post_init__(self) -> None:
        for value, allowed in ((self.shape, SHAPES), (self.color, COLORS), (self.position, POSITIONS),
                               (self.background, BACKGROUNDS), (self.size, SIZES)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {tuple(allowed)}")
        if self.motion is not None and self.motion not in DIRECTIONS:
            raise ValueError(f"motion {self.motion!r} is not one of {DIRECTIONS}")


def caption(scene: Scene) -> str:
    """The English prompt for ``scene`` (grammar in the module docstring)."""
    thing = f"a {scene.size} {scene.color} {scene.shape}"
    where = f"in the {scene.position}" if scene.motion is None else f"moving {_MOTION_WORDS[scene.motion]}"
    return f"{thing} {where} on a {scene.background} background"


def heldout_triples() -> frozenset[tuple[str, str, str]]:
    """(color, shape, position) triples never seen in image training: 18 of 90 (20%).

    Colour i and shape j are held out at position ``POSITIONS[(i + 2 j) % 5]`` (colours in COLORS order),
    so every (colour, shape), (colour, position) and (shape, position) pair still occurs in training.
    """
    return frozenset((c, s, POSITIONS[(i + 2 * j) % len(POSITIONS)])
                     for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES))  # fmt: skip


def heldout_motion_triples() -> frozenset[tuple[str, str, str]]:
    """(color, shape, motion) triples never seen in video training: 18 of 72 (25%).

    Colour i and shape j are held out moving ``DIRECTIONS[(i + j) % 4]``; every pair still occurs in training.
    """
    return frozenset((c, s, DIRECTIONS[(i + j) % len(DIRECTIONS)])
                     for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES))  # fmt: skip


@functools.cache
def _combos(split: str, video: bool) -> tuple[tuple[str, str, str], ...]:
    """The (color, shape, position-or-motion) triples of one split, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    held = heldout_motion_triples() if video else heldout_triples()
    thirds = DIRECTIONS if video else POSITIONS
    every = [(c, s, t) for c in COLORS for s in SHAPES for t in thirds]
    return tuple(x for x in every if (x in held) == (split == "heldout"))


def sample_scene(rng: np.random.Generator, split: Literal["train", "heldout"], video: bool = False) -> Scene:
    """A uniformly random scene of ``split``; background and size are free in both splits."""
    combos = _combos(split, video)
    color, shape, third = combos[int(rng.integers(len(combos)))]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    if not video:
        return Scene(shape, color, third, background, size)
    position = VIDEO_STARTS[third][int(rng.integers(2))]
    return Scene(shape, color, position, background, size, motion=third)


# ----------------------------------------------------------------------------------------------- rendering


def _extents(shape: str, ext: float) -> tuple[float, float, float, float]:
    """Bounding box of a shape relative to its area centroid: (left, right, top, bottom) offsets."""
    if shape == "triangle":
        h = ext * _TRIANGLE_SCALE
        return -h / 2, h / 2, -2 * h / 3, h / 3
    return -ext / 2, ext / 2, -ext / 2, ext / 2


def _fit(shape: str, cx: float, cy: float, ext: float) -> tuple[float, float]:
    """Centroid shifted the least so that the shape's bbox lies inside the frame (with a margin)."""
    left, right, top, bottom = _extents(shape, ext)
    cx = min(max(cx, _MARGIN - left), 1 - _MARGIN - right)
    cy = min(max(cy, _MARGIN - top), 1 - _MARGIN - bottom)
    return cx, cy


def _layout(scene: Scene, rng: np.random.Generator | None) -> tuple[float, float, float]:
    """(centroid x, centroid y, extent) of the shape, in frame fractions, before fitting into the frame."""
    cx, cy = _ANCHORS[scene.position]
    ext = _EXTENT[scene.size]
    if rng is not None:
        dx, dy, ds = rng.uniform(-1.0, 1.0, size=3)
        cx, cy, ext = cx + _JITTER * dx, cy + _JITTER * dy, ext * (1 + _SIZE_JITTER * ds)
    return cx, cy, ext


def _coverage(shape: str, cx: float, cy: float, ext: float, size: int) -> np.ndarray:
    """(size, size) float32 fraction of each pixel covered by the shape (supersampled anti-aliasing)."""
    left, right, top, bottom = _extents(shape, ext)
    x0, x1 = max(0, int((cx + left) * size) - 1), min(size, math.ceil((cx + right) * size) + 1)
    y0, y1 = max(0, int((cy + top) * size) - 1), min(size, math.ceil((cy + bottom) * size) + 1)
    n = _SUPERSAMPLE
    xs = ((np.arange(x0 * n, x1 * n) + 0.5) / (size * n) - cx)[None, :]
    ys = ((np.arange(y0 * n, y1 * n) + 0.5) / (size * n) - cy)[:, None]
    if shape == "circle":
        inside = xs**2 + ys**2 <= (ext / 2) ** 2
    elif shape == "square":
        inside = (np.abs(xs) <= ext / 2) & (np.abs(ys) <= ext / 2)
    else:
        t = (ys - top) / (bottom - top)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(xs) <= t * (right - left) / 2)
    out = np.zeros((size, size), np.float32)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, n, x1 - x0, n).mean(axis=(1, 3))
    return out


def _paint(scene: Scene, cx: float, cy: float, ext: float, size: int) -> np.ndarray:
    """(size, size, 3) uint8 frame with the shape at centroid (cx, cy)."""
    alpha = _coverage(scene.shape, cx, cy, ext, size)[..., None]
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32)
    fg = np.asarray(COLORS[scene.color], np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def render_image(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """(size, size, 3) uint8 image of ``scene``; ``rng`` jitters position and size within the region."""
    cx, cy, ext = _layout(scene, rng)
    return _paint(scene, *_fit(scene.shape, cx, cy, ext), ext, size)


def render_video(
    scene: Scene, num_frames: int = 9, size: int = 64, rng: np.random.Generator | None = None
) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 clip: the shape moves steadily in ``scene.motion`` from its start area
    by 38-48% of the frame (43% without ``rng``), staying fully inside the frame."""
    if scene.motion is None:
        raise ValueError("render_video needs a scene with a motion")
    cx, cy, ext = _layout(scene, rng)
    travel = float(rng.uniform(*_TRAVEL)) if rng is not None else sum(_TRAVEL) / 2
    ux, uy = _UNIT[scene.motion]
    sx, sy = _fit(scene.shape, cx, cy, ext)
    ex, ey = _fit(scene.shape, sx + travel * ux, sy + travel * uy, ext)
    ts = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    return np.stack([_paint(scene, sx + t * (ex - sx), sy + t * (ey - sy), ext, size) for t in ts])


def make_image_batch(
    rng: np.random.Generator, n: int, size: int = 64, split: Literal["train", "heldout"] = "train"
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random jittered images of ``split``: ((n, size, size, 3) uint8, captions, scenes)."""
    scenes = [sample_scene(rng, split) for _ in range(n)]
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render_image(scene, size, rng)
    return images, [caption(s) for s in scenes], scenes


def make_video_batch(
    rng: np.random.Generator,
    n: int,
    num_frames: int = 9,
    size: int = 64,
    split: Literal["train", "heldout"] = "train",
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random jittered clips of ``split``: ((n, num_frames, size, size, 3) uint8, captions, scenes)."""
    scenes = [sample_scene(rng, split, video=True) for _ in range(n)]
    videos = np.zeros((n, num_frames, size, size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        videos[i] = render_video(scene, num_frames, size, rng)
    return videos, [caption(s) for s in scenes], scenes


# ------------------------------------------------------------------------------------------------- checker


@dataclass
class Check:
    """What the checker found: each ``*_ok`` says whether that part of the prompt is visible
    (``motion_ok`` is None for images); ``detail`` is a human-readable summary of the measurements."""

    color_ok: bool
    shape_ok: bool
    position_ok: bool
    motion_ok: bool | None
    detail: str

    @property
    def ok(self) -> bool:
        """All relevant parts are right."""
        return self.color_ok and self.shape_ok and self.position_ok and self.motion_ok is not False


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of a (..., 3) float array (0 where achromatic)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60.0) % 360.0


_PALETTE_HUES = _hue(np.asarray(list(COLORS.values()), np.float32))


def _segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, chroma) of an (H, W, 3) image after light smoothing: labels index COLORS by nearest hue
    (-1 where the chroma is below the floor, i.e. background), chroma is max - min channel (0-255)."""
    x = np.asarray(image, np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {x.shape}")
    if not np.issubdtype(np.asarray(image).dtype, np.integer) and x.max() <= 1.0:
        x = x * 255.0  # floats in [0, 1]
    if min(x.shape[:2]) < _ANALYSIS_SIZE:  # small frames: measure shapes on a bilinear upsampling
        k = math.ceil(_ANALYSIS_SIZE / min(x.shape[:2]))
        small = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
        x = np.asarray(small.resize((x.shape[1] * k, x.shape[0] * k), Image.BILINEAR), np.float32)
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")  # separable [1, 2, 1] / 4 smoothing
    x = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    x = (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    colored = chroma >= _CHROMA_FLOOR
    diff = np.abs(_hue(x[colored])[:, None] - _PALETTE_HUES)
    labels = np.full(chroma.shape, -1, np.int64)
    labels[colored] = np.minimum(diff, 360.0 - diff).argmin(-1)
    return labels, chroma


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square: drops 1-pixel specks and spurs (noise along edges)."""
    h, w = mask.shape

    def window(m: np.ndarray, fill: bool, reduce: np.ufunc) -> np.ndarray:
        p = np.pad(m, 1, constant_values=fill)
        return reduce.reduce([p[i : i + h, j : j + w] for i in range(3) for j in range(3)])

    return window(window(mask, True, np.logical_and), False, np.logical_or)


def _color_mask(labels: np.ndarray, chroma: np.ndarray, k: int) -> np.ndarray:
    """Pixels of palette colour ``k`` at least half as saturated as its typical pixel (the 50% coverage
    contour of a shape on a grey background, whatever the blur), opened to drop specks."""
    sel = labels == k
    if sel.sum() < 4:
        return np.zeros_like(sel)
    peak = np.percentile(chroma[sel], 90)
    return _open(sel & (chroma >= 0.5 * peak))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 8-connected component of ``mask`` (row runs + union-find)."""
    runs: list[tuple[int, int, int]] = []
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # row-major order: pairs up with starts
    prev: list[int] = []
    cur: list[int] = []
    last_row = -2
    for r, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist()):
        if r != last_row:
            prev, cur, last_row = (cur if r == last_row + 1 else []), [], r
        idx = len(runs)
        runs.append((r, s, e))
        parent.append(idx)
        cur.append(idx)
        for p in prev:  # previous-row runs touching [s, e) including diagonals
            if runs[p][1] <= e and s <= runs[p][2]:
                parent[find(p)] = find(idx)
    out = np.zeros(mask.shape, bool)
    if not runs:
        return out
    areas: dict[int, int] = {}
    for i, (_, s, e) in enumerate(runs):
        areas[find(i)] = areas.get(find(i), 0) + e - s
    best = max(areas, key=lambda k: areas[k])
    for i, (r, s, e) in enumerate(runs):
        if find(i) == best:
            out[r, s:e] = True
    return out


def _shape_features(comp: np.ndarray) -> np.ndarray:
    """Blur- and size-robust shape descriptors from the mask's central moments (x right, y down):

    * 4-fold anisotropy E[x^4 + y^4 - 6 x^2 y^2] / E[r^4]: 0 for a circle, -0.43 for an axis-aligned square;
    * skewness of y and of x: -0.57 in y for an apex-up triangle, 0 for symmetric shapes;
    * half the log of var(x) / var(y) (elongation).
    """
    ys, xs = np.nonzero(comp)
    x, y = xs - xs.mean(), ys - ys.mean()
    x2, y2 = x * x, y * y
    vx, vy = max(float(x2.mean()), 1e-6), max(float(y2.mean()), 1e-6)
    r4 = max(float(((x2 + y2) ** 2).mean()), 1e-6)
    c4 = float((x2 * x2 + y2 * y2 - 6 * x2 * y2).mean()) / r4
    skew_y, skew_x = float(y2 @ y) / len(y) / vy**1.5, float(x2 @ x) / len(x) / vx**1.5
    return np.array([c4, skew_y, skew_x, 0.5 * np.log(vx / vy)])


@functools.cache
def _prototypes() -> dict[str, np.ndarray]:
    """Shape features of a clean, large, centred render of each shape (the checker's references)."""
    out = {}
    for shape in SHAPES:
        labels, chroma = _segment(render_image(Scene(shape, "red", "center"), 64))
        out[shape] = _shape_features(_largest_component(_color_mask(labels, chroma, 0)))
    return out


def _region(x: float, y: float) -> str:
    """Named region of a point given in frame fractions."""
    if max(abs(x - 0.5), abs(y - 0.5)) < _CENTER_RADIUS:
        return "center"
    return f"{'top' if y < 0.5 else 'bottom'} {'left' if x < 0.5 else 'right'}"


@dataclass
class _Blob:
    """The asked colour's largest component in one frame, and what was measured on it."""

    area: float  # fraction of the frame
    centroid: tuple[float, float]  # (x, y), fraction of the frame
    rival: float  # area fraction of the largest component of any other palette colour
    shape: str
    shape_dist: float

    @property
    def color_ok(self) -> bool:
        return bool(_MIN_AREA <= self.area <= _MAX_AREA and self.rival <= self.area)

    def shape_ok(self, shape: str) -> bool:
        return bool(self.color_ok and self.shape == shape and self.shape_dist <= _SHAPE_TOL)

    def describe(self) -> str:
        return (f"area={self.area:.3f} rival={self.rival:.3f} centroid=({self.centroid[0]:.2f},"
                f"{self.centroid[1]:.2f}) region={_region(*self.centroid)} shape~{self.shape}"
                f"(d={self.shape_dist:.2f})")  # fmt: skip


def _find(image: np.ndarray, color: str) -> _Blob | None:
    """Segment ``color`` in ``image``; None when no pixel of that colour is found."""
    labels, chroma = _segment(image)
    total = labels.size
    k = list(COLORS).index(color)
    comp = _largest_component(_color_mask(labels, chroma, k))
    if not comp.any():
        return None
    rival = max((_largest_component(_color_mask(labels, chroma, j)).sum() for j in range(len(COLORS))
                 if j != k and (labels == j).sum() > comp.sum()), default=0)  # fmt: skip
    ys, xs = np.nonzero(comp)
    feats = _shape_features(comp)
    dists = {s: float(np.linalg.norm(feats - p)) for s, p in _prototypes().items()}
    best = min(dists, key=lambda s: dists[s])
    h, w = labels.shape
    centroid = (float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h)
    return _Blob(float(comp.sum()) / total, centroid, float(rival) / total, best, dists[best])


def check_image(image: np.ndarray, scene: Scene) -> Check:
    """Does ``image`` show ``scene``'s colour, shape and position? (motion_ok is None)"""
    blob = _find(image, scene.color)
    if blob is None:
        return Check(False, False, False, None, f"no {scene.color} pixels")
    position_ok = bool(blob.color_ok and _region(*blob.centroid) == scene.position)
    return Check(blob.color_ok, blob.shape_ok(scene.shape), position_ok, None, blob.describe())


def _motion(blobs: list[_Blob | None], direction: str) -> tuple[bool, str]:
    """Whether the tracked centroids move in ``direction`` clearly and mostly monotonically."""
    ts = np.array([i for i, b in enumerate(blobs) if b is not None and b.color_ok], np.float64)
    if len(ts) < 2 or len(ts) < _MIN_TRACKED * len(blobs):
        return False, f"tracked in {len(ts)}/{len(blobs)} frames"
    pts = np.array([blobs[int(i)].centroid for i in ts])  # type: ignore[union-attr]
    u = np.array(_UNIT[direction])
    along, across = pts @ u, pts @ np.array([-u[1], u[0]])
    span = ts[-1] - ts[0]
    travel, drift = np.polyfit(ts, along, 1)[0] * span, np.polyfit(ts, across, 1)[0] * span
    steps = np.diff(along)
    monotonic = float(np.mean(steps > -0.02))
    ok = travel >= _MIN_TRAVEL and abs(drift) <= _MAX_DRIFT * travel and monotonic >= _MIN_MONOTONIC
    return bool(ok), f"travel={travel:.2f} drift={drift:.2f} monotonic={monotonic:.2f} tracked={len(ts)}"


def check_video(frames: np.ndarray, scene: Scene) -> Check:
    """Does the clip show ``scene``'s colour and shape (middle frame) moving in ``scene.motion``?

    The asked colour is segmented per frame as in :func:`check_image`. ``motion_ok``: tracked in >= 75% of
    the frames, a least-squares fit of the centroid over time travels >= 20% of the frame in the asked
    direction with sideways drift <= half that, and >= 70% of frame-to-frame steps do not go back by more
    than 2%. The caption names no position, so ``position_ok`` only means "tracked in >= 75% of frames".
    """
    if scene.motion is None:
        raise ValueError("check_video needs a scene with a motion")
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"expected (F >= 2, H, W, 3) frames, got shape {frames.shape}")
    blobs = [_find(f, scene.color) for f in frames]
    mid = blobs[len(blobs) // 2]
    tracked = sum(b is not None and b.color_ok for b in blobs)
    motion_ok, motion_detail = _motion(blobs, scene.motion)
    color_ok = mid is not None and mid.color_ok
    shape_ok = mid is not None and mid.shape_ok(scene.shape)
    detail = f"{motion_detail}; middle frame: {mid.describe() if mid else 'no ' + scene.color + ' pixels'}"
    return Check(color_ok, shape_ok, tracked >= _MIN_TRACKED * len(blobs), motion_ok, detail)


# ----------------------------------------------------------------------------------------------------- CLI


def _sheet(tiles: list[tuple[np.ndarray, str]], scale: int, cols: int) -> Image.Image:
    """Contact sheet: each tile's frames side by side, upscaled ``scale``x, its text wrapped underneath,
    ``cols`` tiles per row on a light grey canvas."""
    gap = np.full((tiles[0][0].shape[1], 2, 3), 200, np.uint8)
    strips = [np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1) for frames, _ in tiles]
    tw, th = strips[0].shape[1] * scale, strips[0].shape[0] * scale
    lines = [textwrap.wrap(text, max(20, tw // 6)) for _, text in tiles]
    cell_w, cell_h = tw + 8, th + 12 * max(len(ls) for ls in lines) + 10
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cell_w * min(cols, len(tiles)), cell_h * rows), (200, 200, 200))
    draw = ImageDraw.Draw(sheet)
    for i, (strip, text_lines) in enumerate(zip(strips, lines)):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        sheet.paste(Image.fromarray(strip).resize((tw, th), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + th + 3), "\n".join(text_lines), fill=(0, 0, 0), spacing=2)
    return sheet


def main(argv: list[str] | None = None) -> None:
    """``python -m tools.train_embedded.shapes OUT_DIR``: write images.png and videos.png contact sheets of
    random scenes with their captions and the checker's verdict, for eyeballing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n", type=int, default=16, help="scenes per sheet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    images, caps, scenes = make_image_batch(rng, args.n, split=args.split)
    tiles = [(im[None], f"{c} [ok={check_image(im, s).ok}]") for im, c, s in zip(images, caps, scenes)]
    _sheet(tiles, 3, cols=4).save(args.out_dir / "images.png")
    videos, caps, scenes = make_video_batch(rng, args.n, split=args.split)
    tiles = [(v, f"{c} [ok={check_video(v, s).ok}]") for v, c, s in zip(videos, caps, scenes)]
    _sheet(tiles, 2, cols=1).save(args.out_dir / "videos.png")
    print(f"wrote {args.out_dir / 'images.png'} and {args.out_dir / 'videos.png'}")


if __name__ == "__main__":
    main()
