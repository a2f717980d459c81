"""CPU smoke test of the embedded-model trainer (tools/train_embedded): a few seconds of training at the
``tiny`` preset, the written repo loads and generates through diffserve's Engine with its own defaults,
resume continues the step counters, and the shipped (default-preset) model fits the repo size budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.train_embedded import image


def _progress(out: Path) -> dict:
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    return state["progress"] | {"config": state["config"]}


def test_train_resume_load_generate(tmp_path: Path) -> None:
    from diffserve import Engine

    out = tmp_path / "run"
    common = ["--out", str(out), "--preset", "tiny", "--device", "cpu", "--workers", "1", "--log-every", "5"]
    assert image.main([*common, "--minutes", "0.12", "--eval-images", "0", "--reserve-seconds", "0"]) == 0
    first = _progress(out)
    assert first["phase"] == "dit" and first["vae_step"] > 0 and first["dit_step"] > 0
    assert first["config"]["t5_length"] in (32, 64, 128, 256)  # chosen from the captions

    with pytest.raises(SystemExit):  # an existing run is never silently overwritten
        image.main([*common, "--minutes", "0.1"])

    assert image.main([*common, "--minutes", "0.1", "--resume", "--eval-images", "2", "--reserve-seconds", "4"]) == 0
    second = _progress(out)
    assert second["vae_step"] == first["vae_step"]  # the VAE phase is over and stays so
    assert second["dit_step"] > first["dit_step"] and second["next_chunk"] > first["next_chunk"]
    assert second["runs"] == 2 and second["config"] == first["config"]
    info = json.loads((out / "training_info.json").read_text())
    assert set(info["eval"]) == {"heldout", "train", "vae_reconstruction"}
    assert (out / "samples_heldout.png").is_file()

    repo = out / "repo"
    defaults = json.loads((repo / "diffserve_defaults.json").read_text())
    assert defaults == {"height": 64, "width": 64, "num_inference_steps": image.PRESETS["tiny"].steps_default,
                        "guidance_scale": 0.0, "max_sequence_length": first["config"]["t5_length"]}
    vae_cfg = json.loads((repo / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(second["latent_scale"])
    assert vae_cfg["shift_factor"] == pytest.approx(second["latent_shift"])

    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    assert not engine.pipeline.components.transformer.cfg.guidance_embeds  # schnell-like: no guidance input
    d = engine.defaults
    assert (d.height, d.width, d.num_inference_steps, d.max_sequence_length) == (
        64, 64, defaults["num_inference_steps"], defaults["max_sequence_length"])
    result = engine.generate("a large red circle in the top left on a white background", seed=1)
    img = np.asarray(result.images[0])
    assert img.shape == (64, 64, 3) and img.std() > 0
    assert result.request.max_sequence_length == first["config"]["t5_length"]
    assert sum(f.stat().st_size for f in repo.rglob("*") if f.is_file()) <= image.REPO_BUDGET_MB * 2**20


def test_default_model_fits_the_repo_budget() -> None:
    """The shipped (default preset) model in fp16, plus tokenizer files (~0.5 MB), stays under budget."""
    sizes = image.model_sizes(image.PRESETS["default"])
    weights_mb = 2 * sum(sizes.values()) / 2**20
    assert weights_mb + 0.5 <= image.REPO_BUDGET_MB, sizes
    assert 3e6 <= sizes["transformer"] <= 6e6
