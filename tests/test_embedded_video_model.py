"""The embedded shapes video model: loads through the normal Wan pipeline and moves the asked-for shape in the
asked-for direction, checked automatically on held-out prompts (colour/shape/motion combinations never seen
in training); and the CLI picks it when a video is asked for without --model-path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffserve import Engine
from diffserve.cli import main
from diffserve.embedded import embedded_model
from diffserve.testing.batched import generate_outputs
from tools.train_embedded.shapes import (
    DIRECTIONS,
    Scene,
    caption,
    check_video,
    heldout_motion_triples,
    sample_scene,
)

pytestmark = pytest.mark.skipif(embedded_model("video") is None, reason="no embedded video model shipped")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("embedded:video", dtype="fp32", device="cpu")


def test_defaults_come_from_the_repo(engine: Engine) -> None:
    d = engine.defaults
    assert d.kind == "video" and engine.pipeline_class == "WanPipeline"
    assert (d.num_frames, d.height, d.width, d.num_inference_steps, d.max_sequence_length) == (9, 64, 64, 20, 32)


def test_heldout_prompts_move_the_right_way(engine: Engine) -> None:
    """The issue's criterion is the motion direction (>= 80%); the stricter whole check (colour and shape of
    the middle frame as well) measured 73% of 64 held-out prompts here, and is held above 60%."""
    rng = np.random.default_rng(2026)
    scenes = [sample_scene(rng, "heldout", video=True) for _ in range(32)]
    assert all((s.color, s.shape, s.motion) in heldout_motion_triples() for s in scenes)
    videos, per_video = generate_outputs(engine, [caption(s) for s in scenes], batch=16, seed0=100)
    checks = [check_video(v, s) for v, s in zip(videos, scenes)]
    motion = sum(bool(c.motion_ok) for c in checks) / len(checks)
    whole = sum(c.ok for c in checks) / len(checks)
    print(f"embedded video model: motion direction {motion:.0%}, colour+shape+motion {whole:.0%} of "
          f"{len(checks)} held-out prompts; {per_video:.3f} s/video (CPU)")
    failed = [f"{caption(s)}: {c.detail}" for c, s in zip(checks, scenes) if not c.motion_ok]
    assert motion >= 0.8, failed
    assert whole >= 0.6, [f"{caption(s)}: {c.detail}" for c, s in zip(checks, scenes) if not c.ok]


def test_prompt_direction_changes_the_motion(engine: Engine) -> None:
    """Same seed and scene, each of the four directions: the checker sees every clip move as asked."""
    for direction in DIRECTIONS:
        scene = Scene(shape="circle", color="red", position="center", background="white", size="large",
                      motion=direction)
        frames = np.asarray(engine.generate(caption(scene), seed=3).videos[0])
        check = check_video(frames, scene)
        assert check.motion_ok, (caption(scene), check.detail)


def test_cli_without_model_path_makes_a_video(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--prompt", "a large blue square moving to the right on a black background",
                 "--num-frames", "9", "--output-dir", str(tmp_path), "--seed", "1"]) == 0
    assert "using the embedded video model" in capsys.readouterr().err
    assert len(list(tmp_path.glob("*.mp4"))) == 1
