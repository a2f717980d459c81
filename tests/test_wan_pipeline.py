"""Whole Wan2.1 pipelines (T2V, I2V) against diffusers' WanPipeline / WanImageToVideoPipeline (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

from diffserve import Engine, GenerationRequest
from diffserve.errors import InvalidRequestError
from diffserve.pipelines.base import PipelineState

PROMPT = "a blue square moving to the right"
PARAMS = dict(height=16, width=32, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
              negative_prompt="bad quality", max_sequence_length=32)


def _image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(24, 40, 3) * 255).astype(np.uint8))


def _ours(engine: Engine, **params) -> np.ndarray:
    state = PipelineState(requests=[GenerationRequest(prompt=PROMPT, **params)], device=torch.device("cpu"),
                          dtype=torch.float32)
    engine.pipeline(state)
    return state.pixels.permute(0, 2, 3, 4, 1).numpy()  # (B, F, H, W, 3)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_video_matches_diffusers(kind: str, request: pytest.FixtureRequest) -> None:
    repo: Path = request.getfixturevalue(f"wan_{kind}_repo")
    # diffusers' Wan I2V transformer splits [image; text] assuming exactly 512 text tokens: use 512 there
    extra = {"image": _image(), "max_sequence_length": 512} if kind == "i2v" else {}
    cls = WanImageToVideoPipeline if kind == "i2v" else WanPipeline
    n = 1 if kind == "i2v" else 2  # diffusers' I2V pipeline fails for num_videos_per_prompt > 1
    ref = cls.from_pretrained(repo, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    params = {**PARAMS, **extra}
    expected = ref(prompt=PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", num_videos_per_prompt=n,
                   **params).frames
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    got = _ours(engine, seed=3, num_outputs=n, **params)
    diff = float(np.abs(got - expected).max())
    print(f"Wan {kind} pipeline max pixel difference: {diff:.3e} (x255 = {diff * 255:.4f})")
    assert got.shape == expected.shape == (n, 9, 16, 32, 3)
    assert float(expected.std()) > 0.005
    assert diff <= 1 / 255


def test_generate_returns_frames_and_defaults(wan_t2v_repo: Path) -> None:
    engine = Engine.from_pretrained(str(wan_t2v_repo), dtype="fp32", device="cpu")
    d = engine.defaults
    assert (d.kind, d.height, d.width, d.num_frames, d.fps) == ("video", 480, 832, 81, 16)
    assert (d.num_inference_steps, d.guidance_scale) == (50, 5.0)
    res = engine.generate(PROMPT, height=16, width=16, num_frames=5, num_inference_steps=2, seed=1)
    assert len(res.videos) == 1 and res.videos[0].shape == (5, 16, 16, 3) and res.videos[0].dtype == np.uint8
    assert res.fps == 16 and res.seed == 1
    assert "text_encoding" in res.timings and "decoding" in res.timings


@pytest.mark.parametrize("frames", [8, 0, 1000])
def test_bad_frame_counts(wan_t2v_repo: Path, frames: int) -> None:
    engine = Engine.from_pretrained(str(wan_t2v_repo), dtype="fp32", device="cpu")
    with pytest.raises(InvalidRequestError, match="4k\\+1"):
        engine.validate(GenerationRequest(prompt="x", num_frames=frames))


def test_i2v_needs_image_and_t2v_refuses_one(wan_t2v_repo: Path, wan_i2v_repo: Path) -> None:
    i2v = Engine.from_pretrained(str(wan_i2v_repo), dtype="fp32", device="cpu")
    with pytest.raises(InvalidRequestError, match="needs an input image"):
        i2v.validate(GenerationRequest(prompt="x"))
    t2v = Engine.from_pretrained(str(wan_t2v_repo), dtype="fp32", device="cpu")
    with pytest.raises(InvalidRequestError, match="does not take an input image"):
        t2v.validate(GenerationRequest(prompt="x", image=_image()))
