"""The embedded shapes image model: loads through the normal FLUX pipeline and draws what it is asked,
checked automatically on held-out prompts (colour/shape/position combinations never seen in training)."""

from __future__ import annotations

import numpy as np
import pytest

from diffserve import Engine
from diffserve.embedded import embedded_model
from diffserve.testing.batched import generate_outputs
from tools.train_embedded.shapes import caption, check_image, heldout_triples, sample_scene

pytestmark = pytest.mark.skipif(embedded_model("image") is None, reason="no embedded image model shipped")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()  # no path: the embedded image model, on the CPU in fp32


def test_defaults_come_from_the_repo(engine: Engine) -> None:
    d = engine.defaults
    assert (d.height, d.width, d.num_inference_steps, d.max_sequence_length) == (64, 64, 20, 32)
    assert engine.pipeline_class == "FluxPipeline"


def test_heldout_prompts_pass_the_checker(engine: Engine) -> None:
    rng = np.random.default_rng(2026)
    scenes = [sample_scene(rng, "heldout") for _ in range(40)]
    assert all((s.color, s.shape, s.position) in heldout_triples() for s in scenes)
    images, per_image = generate_outputs(engine, [caption(s) for s in scenes], batch=8, seed0=100)
    checks = [check_image(im, s) for im, s in zip(images, scenes)]
    rate = sum(c.ok for c in checks) / len(checks)
    print(f"embedded image model: {rate:.0%} of {len(checks)} held-out prompts pass; {per_image:.3f} s/image (CPU)")
    failed = [f"{caption(s)}: {c.detail}" for c, s in zip(checks, scenes) if not c.ok]
    assert rate >= 0.8, failed


def test_prompt_changes_the_picture(engine: Engine) -> None:
    a = engine.generate("a large red circle in the top left on a white background", seed=1).images[0]
    b = engine.generate("a large blue square in the bottom right on a black background", seed=1).images[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean() > 20
