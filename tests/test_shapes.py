"""Tests for tools.train_embedded.shapes: the procedural scenes the embedded models are trained on and the
automatic checker that grades them. Acceptance rates are printed (run with ``-s`` to see them)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tools.train_embedded import shapes as S
from tools.train_embedded.shapes import Scene

IMAGE_CAPTION = re.compile(
    r"a (small|large) (red|green|blue|yellow|orange|purple) (circle|square|triangle) in the "
    r"(top left|top right|bottom left|bottom right|center) on a (white|black|gray) background"
)
VIDEO_CAPTION = re.compile(
    r"a (small|large) (red|green|blue|yellow|orange|purple) (circle|square|triangle) moving "
    r"(to the left|to the right|up|down) on a (white|black|gray) background"
)


def all_image_scenes() -> Iterator[Scene]:
    """Every colour x shape x position x background x size (540 scenes)."""
    for c, s, p, b, z in itertools.product(S.COLORS, S.SHAPES, S.POSITIONS, S.BACKGROUNDS, S.SIZES):
        yield Scene(s, c, p, b, z)


def all_video_scenes(rng: np.random.Generator) -> Iterator[Scene]:
    """Every colour x shape x direction, with a random start area, background and size (72 scenes)."""
    for c, s, d in itertools.product(S.COLORS, S.SHAPES, S.DIRECTIONS):
        start = S.VIDEO_STARTS[d][int(rng.integers(2))]
        bg = tuple(S.BACKGROUNDS)[int(rng.integers(3))]
        yield Scene(s, c, start, bg, S.SIZES[int(rng.integers(2))], motion=d)


def degrade(
    image: np.ndarray, rng: np.random.Generator, shift: np.ndarray | None = None, blur: float = 1.5
) -> np.ndarray:
    """What an imperfect generator might produce: Gaussian blur (sigma 1.5 px at 64 px), noise (std 10/255)
    and a per-channel colour shift of up to +-15/255."""
    shift = rng.uniform(-15, 15, 3) if shift is None else shift
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), np.float64)
    return np.clip(np.rint(blurred + rng.normal(0, 10, image.shape) + shift), 0, 255).astype(np.uint8)


def degrade_video(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shift = rng.uniform(-15, 15, 3)
    return np.stack([degrade(f, rng, shift) for f in frames])


def rate(oks: list[bool]) -> float:
    return sum(oks) / len(oks)


# ------------------------------------------------------------------------------------------ data generator


def test_batches_are_deterministic_from_the_seed() -> None:
    a = S.make_image_batch(np.random.default_rng(7), 6)
    b = S.make_image_batch(np.random.default_rng(7), 6)
    c = S.make_image_batch(np.random.default_rng(8), 6)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert a[1] != c[1] or not np.array_equal(a[0], c[0])
    assert a[0].shape == (6, 64, 64, 3) and a[0].dtype == np.uint8

    v1 = S.make_video_batch(np.random.default_rng(3), 3, num_frames=5, size=32, split="heldout")
    v2 = S.make_video_batch(np.random.default_rng(3), 3, num_frames=5, size=32, split="heldout")
    assert np.array_equal(v1[0], v2[0]) and v1[1] == v2[1]
    assert v1[0].shape == (3, 5, 32, 32, 3) and v1[0].dtype == np.uint8
    assert S.make_image_batch(np.random.default_rng(0), 0)[0].shape == (0, 64, 64, 3)

    scene = Scene("triangle", "green", "center")
    assert np.array_equal(S.render_image(scene), S.render_image(scene))  # no rng: the canonical layout
    jittered = [S.render_image(scene, rng=np.random.default_rng(i)) for i in range(2)]
    assert not np.array_equal(jittered[0], jittered[1])


def test_caption_grammar() -> None:
    red = "a large red circle in the top left on a white background"
    assert S.caption(Scene("circle", "red", "top left")) == red
    assert (
        S.caption(Scene("triangle", "orange", "center", "gray", "small"))
        == "a small orange triangle in the center on a gray background"
    )
    video = Scene("square", "blue", "top left", "black", motion="right")
    assert S.caption(video) == "a large blue square moving to the right on a black background"
    up = Scene("circle", "purple", "bottom left", motion="up")
    assert S.caption(up) == "a large purple circle moving up on a white background"
    rng = np.random.default_rng(0)
    for split in ("train", "heldout"):
        assert all(IMAGE_CAPTION.fullmatch(c) for c in S.make_image_batch(rng, 50, 16, split)[1])
        assert all(VIDEO_CAPTION.fullmatch(c) for c in S.make_video_batch(rng, 20, 2, 16, split)[1])


def test_scene_rejects_unknown_values() -> None:
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "center")
    with pytest.raises(ValueError):
        Scene("circle", "red", "center", motion="sideways")
    with pytest.raises(ValueError):
        S.sample_scene(np.random.default_rng(0), "test")  # type: ignore[arg-type]


@pytest.mark.parametrize("video", [False, True])
def test_heldout_split(video: bool) -> None:
    held = S.heldout_motion_triples() if video else S.heldout_triples()
    thirds = S.DIRECTIONS if video else S.POSITIONS
    total = len(S.COLORS) * len(S.SHAPES) * len(thirds)
    assert len(held) == 18 and 0.19 <= len(held) / total <= 0.26
    train = {(c, s, t) for c in S.COLORS for s in S.SHAPES for t in thirds} - held
    for i, j in itertools.combinations(range(3), 2):  # every attribute pair still occurs in training
        pairs = {(x[i], x[j]) for x in train}
        assert pairs == set(itertools.product(*[(list(S.COLORS), S.SHAPES, thirds)[k] for k in (i, j)]))

    rng = np.random.default_rng(1)
    seen: dict[str, set] = {"train": set(), "heldout": set()}
    for split in ("train", "heldout"):
        for _ in range(1500):
            scene = S.sample_scene(rng, split, video=video)  # type: ignore[arg-type]
            key = (scene.color, scene.shape, scene.motion if video else scene.position)
            assert (key in held) == (split == "heldout"), (split, key)
            assert (scene.motion is not None) == video
            if video:
                assert scene.position in S.VIDEO_STARTS[scene.motion]
            seen[split].add(key)
            seen[split].add((scene.background, scene.size))
    assert held <= seen["heldout"] and train <= seen["train"]  # uniform sampling reaches every combination
    for bg, size in itertools.product(S.BACKGROUNDS, S.SIZES):
        assert (bg, size) in seen["train"] and (bg, size) in seen["heldout"]


def test_heldout_triples_are_the_documented_latin_pattern() -> None:
    colors = list(S.COLORS)
    expected = {
        (c, s, S.POSITIONS[(i + 2 * j) % 5]) for i, c in enumerate(colors) for j, s in enumerate(S.SHAPES)
    }
    assert S.heldout_triples() == expected
    assert ("red", "circle", "top left") in expected and ("purple", "triangle", "center") in expected


def test_palette_is_separated_and_contrasts_with_every_background() -> None:
    hues = S._hue(np.asarray(list(S.COLORS.values()), np.float64))
    for a, b in itertools.combinations(hues, 2):
        assert min(abs(a - b), 360 - abs(a - b)) >= 25
    for rgb in S.COLORS.values():
        assert max(rgb) - min(rgb) >= 150  # saturated
        for bg in S.BACKGROUNDS.values():
            assert np.linalg.norm(np.subtract(rgb, bg)) >= 100


def test_videos_move_clearly_and_stay_inside_the_frame() -> None:
    rng = np.random.default_rng(2)
    for scene in all_video_scenes(rng):
        frames = S.render_video(scene, rng=rng)
        assert frames.shape == (9, 64, 64, 3)
        bg = np.asarray(S.BACKGROUNDS[scene.background])
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
        assert (border == bg).all(), scene  # fully inside the frame in every frame
        fg = np.asarray(S.COLORS[scene.color])
        alpha = (frames - bg) @ (fg - bg) / float((fg - bg) @ (fg - bg))  # anti-aliased coverage
        grid = (np.arange(64) + 0.5) / 64
        mass = alpha.sum((1, 2))
        centroids = np.stack([(alpha.sum(1) @ grid) / mass, (alpha.sum(2) @ grid) / mass], axis=1)
        step = centroids[-1] - centroids[0]
        along = step @ np.asarray(S._UNIT[scene.motion])
        assert 0.35 <= along <= 0.5 and abs(step).sum() - along < 0.002, (scene, step)
        assert np.allclose(np.diff(centroids, axis=0), step / 8, atol=0.006)  # steady (within 0.4 px)
    for scene in itertools.islice(all_image_scenes(), 0, None, 7):
        image = S.render_image(scene, rng=rng)
        bg = np.asarray(S.BACKGROUNDS[scene.background])
        assert (np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]) == bg).all(), scene


# ------------------------------------------------------------------------------------------------- checker


def test_checker_accepts_clean_and_degraded_images() -> None:
    rng = np.random.default_rng(0)
    clean, degraded, failures = [], [], []
    for _seed in range(2):
        for scene in all_image_scenes():
            image = S.render_image(scene, rng=rng)
            clean.append(S.check_image(image, scene).ok)
            check = S.check_image(degrade(image, rng), scene)
            degraded.append(check.ok)
            if not check.ok:
                failures.append(f"{S.caption(scene)}: {check.detail}")
    print(f"\nimage checker acceptance: clean {rate(clean):.2%} of {len(clean)}, "
          f"blurred+noisy+shifted {rate(degraded):.2%} of {len(degraded)}")  # fmt: skip
    assert rate(clean) >= 0.99
    assert rate(degraded) >= 0.90, failures[:5]


def test_checker_rejects_wrong_colour_shape_and_position() -> None:
    rng = np.random.default_rng(1)
    colors = list(S.COLORS)
    wrong: dict[str, list[bool]] = {"color": [], "shape": [], "position": []}
    for i, scene in enumerate(all_image_scenes()):
        image = S.render_image(scene, rng=rng)
        if i % 2:
            image = degrade(image, rng)
        color = colors[(colors.index(scene.color) + 1 + i % 5) % 6]
        shape = S.SHAPES[(S.SHAPES.index(scene.shape) + 1 + i % 2) % 3]
        position = S.POSITIONS[(S.POSITIONS.index(scene.position) + 1 + i % 4) % 5]
        asked = {
            "color": Scene(scene.shape, color, scene.position),
            "shape": Scene(shape, scene.color, scene.position),
            "position": Scene(scene.shape, scene.color, position),
        }
        for part, wrong_scene in asked.items():
            check = S.check_image(image, wrong_scene)
            wrong[part].append(check.ok)
            assert not getattr(check, f"{part}_ok"), (scene, part, check)
    print(
        "\nimage checker false accepts: "
        + ", ".join(f"{k} {rate(v):.2%} of {len(v)}" for k, v in wrong.items())
    )
    assert not any(any(v) for v in wrong.values())

    # circle checked as square and the reverse, the classic confusion
    circle, square = Scene("circle", "red", "center"), Scene("square", "red", "center")
    assert not S.check_image(S.render_image(circle), square).ok
    assert not S.check_image(S.render_image(square), circle).ok


def test_checker_works_on_32_px_frames() -> None:
    rng = np.random.default_rng(4)
    accepted, wrong = [], []
    for i, scene in enumerate(itertools.islice(all_image_scenes(), 0, None, 2)):
        image = degrade(S.render_image(scene, 32, rng), rng, blur=0.75)
        accepted.append(S.check_image(image, scene).ok)
        shape = S.SHAPES[(S.SHAPES.index(scene.shape) + 1 + i % 2) % 3]
        wrong.append(S.check_image(image, Scene(shape, scene.color, scene.position)).ok)
    frames = S.render_video(Scene("triangle", "yellow", "bottom left", "black", "small", "up"), 5, 32)
    assert S.check_video(frames, Scene("triangle", "yellow", "bottom left", motion="up")).ok
    print(f"\n32 px degraded images: accepted {rate(accepted):.2%}, wrong shape accepted {rate(wrong):.2%}")
    assert rate(accepted) >= 0.95 and not any(wrong)


def test_checker_rejects_blank_and_noise_images() -> None:
    rng = np.random.default_rng(2)
    accepted = {"blank": [], "uniform noise": [], "blurred noise": [], "colour fill": []}
    for _ in range(100):
        scene = S.sample_scene(rng, "train")
        blank = np.full((64, 64, 3), S.BACKGROUNDS[scene.background], np.uint8)
        accepted["blank"].append(S.check_image(blank, scene).ok)
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        accepted["uniform noise"].append(S.check_image(noise, scene).ok)
        blurred = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5)))
        accepted["blurred noise"].append(S.check_image(blurred, scene).ok)
        fill = np.full((64, 64, 3), S.COLORS[scene.color], np.uint8)
        accepted["colour fill"].append(S.check_image(fill, scene).ok)
    print("\nimage checker accepts junk: " + ", ".join(f"{k} {rate(v):.0%}" for k, v in accepted.items()))
    assert not any(accepted["blank"] + accepted["uniform noise"] + accepted["colour fill"])
    assert rate(accepted["blurred noise"]) <= 0.03


def test_checker_rejects_a_second_dominant_colour() -> None:
    red = S.render_image(Scene("circle", "red", "top left", size="small"))
    blue = S.render_image(Scene("square", "blue", "bottom right", size="large"))
    both = np.where((red != 255).any(-1, keepdims=True), red, blue)
    assert not S.check_image(both, Scene("circle", "red", "top left")).color_ok  # the blue square is larger
    assert S.check_image(both, Scene("square", "blue", "bottom right")).ok


def test_video_checker_accepts_motion_and_rejects_wrong_directions() -> None:
    rng = np.random.default_rng(3)
    clean, degraded, wrong, failures = [], [], [], []
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    scenes = [*all_video_scenes(rng), *all_video_scenes(rng)]
    for i, scene in enumerate(scenes):
        frames = S.render_video(scene, rng=rng)
        clean.append(S.check_video(frames, scene).ok)
        noisy = degrade_video(frames, rng)
        check = S.check_video(noisy, scene)
        degraded.append(check.ok)
        if not check.ok:
            failures.append(f"{S.caption(scene)}: {check.detail}")
        turned = [d for d in S.DIRECTIONS if d not in (scene.motion, opposite[scene.motion])][i % 2]
        wrong_motion = (opposite[scene.motion], turned)[i % 2]
        check = S.check_video(noisy, Scene(scene.shape, scene.color, scene.position, motion=wrong_motion))
        wrong.append(check.ok)
        assert check.motion_ok is False, (scene, wrong_motion, check)
    print(
        f"\nvideo checker acceptance: clean {rate(clean):.2%} of {len(clean)}, blurred+noisy+shifted "
        f"{rate(degraded):.2%} of {len(degraded)}; wrong direction accepted {rate(wrong):.2%} of {len(wrong)}"
    )
    assert rate(clean) >= 0.99 and rate(degraded) >= 0.90, failures[:5]


def test_video_checker_rejects_static_reversed_and_vanishing_clips() -> None:
    scene = Scene("square", "green", "top left", "gray", motion="right")
    frames = S.render_video(scene)
    assert S.check_video(frames, scene).ok
    still = np.repeat(frames[:1], len(frames), axis=0)
    assert S.check_video(still, scene).motion_ok is False
    assert S.check_video(frames[::-1], scene).motion_ok is False
    shuffled = frames[[0, 8, 1, 7, 2, 6, 3, 5, 4]]  # ends near where it started after jumping back and forth
    assert S.check_video(shuffled, scene).motion_ok is False
    vanishing = frames.copy()
    vanishing[3:] = np.asarray(S.BACKGROUNDS["gray"], np.uint8)
    check = S.check_video(vanishing, scene)
    assert check.motion_ok is False and not check.position_ok
    assert not S.check_video(frames, Scene("square", "red", "top left", motion="right")).ok
    assert S.check_image(frames[0], Scene("square", "green", "top left")).motion_ok is None


def test_cli_writes_contact_sheets(tmp_path) -> None:
    S.main([str(tmp_path), "--n", "3", "--seed", "1"])
    for name in ("images.png", "videos.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
