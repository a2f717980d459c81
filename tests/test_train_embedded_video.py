"""CPU smoke test of the embedded video-model trainer (tools/train_embedded/video.py): a few seconds of
training at the ``tiny`` preset, the written WanPipeline repo loads through diffserve's Engine with its own
defaults and generates a video of the trained size, resume continues the step counters, and the
default-preset model fits the repo size budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.train_embedded import video


def _progress(out: Path) -> dict:
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    return state["progress"] | {"config": state["config"]}


def test_train_resume_load_generate(tmp_path: Path) -> None:
    from diffserve import Engine

    out = tmp_path / "run"
    common = ["--out", str(out), "--preset", "tiny", "--device", "cpu", "--workers", "1", "--log-every", "5",
              "--eval-videos", "0", "--reserve-seconds", "0"]
    assert video.main([*common, "--minutes", "0.12"]) == 0
    first = _progress(out)
    assert first["phase"] == "dit" and first["vae_step"] > 0 and first["dit_step"] > 0
    assert first["config"]["t5_length"] in (32, 64, 128, 256)  # chosen from the captions
    z_dim = first["config"]["z_dim"]
    assert len(first["latents_mean"]) == len(first["latents_std"]) == z_dim

    with pytest.raises(SystemExit):  # an existing run is never silently overwritten
        video.main([*common, "--minutes", "0.1"])

    assert video.main([*common, "--minutes", "0.07", "--resume"]) == 0
    second = _progress(out)
    assert second["vae_step"] == first["vae_step"]  # the VAE phase is over and stays so
    assert second["dit_step"] > first["dit_step"] and second["next_chunk"] > first["next_chunk"]
    assert second["runs"] == 2 and second["config"] == first["config"]

    repo = out / "repo"
    cfg = video.PRESETS["tiny"]
    defaults = json.loads((repo / "diffserve_defaults.json").read_text())
    assert defaults == {"height": 64, "width": 64, "num_frames": 9, "fps": cfg.fps,
                        "num_inference_steps": cfg.steps_default, "guidance_scale": 1.0,
                        "max_sequence_length": first["config"]["t5_length"]}
    vae_cfg = json.loads((repo / "vae" / "config.json").read_text())
    assert vae_cfg["z_dim"] == z_dim
    assert vae_cfg["latents_mean"] == pytest.approx(second["latents_mean"])
    assert vae_cfg["latents_std"] == pytest.approx(second["latents_std"])
    assert json.loads((repo / "model_index.json").read_text())["_class_name"] == "WanPipeline"

    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    d = engine.defaults
    assert d.kind == "video"
    assert {k: getattr(d, k) for k in defaults} == defaults
    result = engine.generate("a large red circle moving to the left on a white background", seed=1,
                             num_inference_steps=2)
    frames = np.asarray(result.videos[0])
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8 and frames.std() > 0
    assert result.request.max_sequence_length == first["config"]["t5_length"]
    assert sum(f.stat().st_size for f in repo.rglob("*") if f.is_file()) <= video.REPO_BUDGET_MB * 2**20

    # --init-from: a new run starts from the written repo's weights (what a later GPU session continues)
    run = video.prepare_run(video_args(tmp_path / "again", init_from=repo), torch.device("cpu"))
    from diffusers import WanTransformer3DModel

    written = WanTransformer3DModel.from_pretrained(repo / "transformer").state_dict()
    assert all(torch.equal(run.dit.state_dict()[k], v.float()) for k, v in written.items())
    assert run.p.phase == "vae" and run.p.vae_step == 0 and run.p.history[-1] == ["init_from", str(repo)]


def video_args(out: Path, **kw):
    import argparse

    return argparse.Namespace(**({"out": out, "resume": False, "export_only": False, "preset": "tiny", "seed": 0,
                                  "init_from": None} | kw))


def test_default_model_fits_the_repo_budget() -> None:
    """The default-preset model in fp16, plus the tokenizer (~0.03 MB), stays under budget, and its
    latent grid is 3 x 8 x 8 for 9 frames of 64 x 64."""
    cfg = video.PRESETS["default"]
    sizes = video.model_sizes(cfg)
    assert 2 * sum(sizes.values()) / 2**20 + 0.1 <= video.REPO_BUDGET_MB, sizes
    assert (video.latent_frames(cfg), video.latent_size(cfg)) == (3, 8)
