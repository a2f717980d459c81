"""The Python API (issue 16, items 4-6): `Engine.generate` with typed keyword arguments, lists of prompts,
a progress bar; `GenerationResult.save` with the generation written into the files; the model catalog
behind `diffserve models` and GET /v1/models; the busy-port check of `serve`."""

from __future__ import annotations

import inspect
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffserve import Engine
from diffserve.cli import main
from diffserve.cli_args import check_port_free
from diffserve.errors import InvalidRequestError, UserError
from diffserve.media import read_metadata
from diffserve.models_catalog import format_catalog, list_models, model_card
from diffserve.testing.fixtures import CONFIG_DIR

SMALL = {"height": 32, "width": 32, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def flux(flux_dev_repo: Path) -> Engine:
    return Engine.from_pretrained(str(flux_dev_repo), dtype="fp32", device="cpu")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def test_generate_has_typed_keywords_and_a_docstring() -> None:
    sig = inspect.signature(Engine.generate)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    doc = inspect.getdoc(Engine.generate) or ""
    for name in ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "seed",
                 "num_outputs", "num_frames", "image", "progress"):
        assert name in sig.parameters and name in doc, name


def test_list_of_prompts_gives_one_result_each_with_its_seed(flux: Engine, capsys) -> None:
    results = flux.generate(["a red circle", "a blue square"], seed=7, progress=False, **SMALL)
    assert [r.seed for r in results] == [7, 8] and [r.request.prompt for r in results] == ["a red circle",
                                                                                         "a blue square"]
    alone = flux.generate("a blue square", seed=8, progress=False, **SMALL)
    assert np.abs(_pixels(alone.images[0]) - _pixels(results[1].images[0])).max() <= 1
    assert "denoising" not in capsys.readouterr().err  # progress=False: no bar


def test_progress_bar_on_by_default_and_random_seed(flux: Engine, capsys) -> None:
    steps: list[tuple[int, int]] = []
    result = flux.generate("a red circle", seed=-1, on_step=lambda d, t: steps.append((d, t)), **SMALL)
    assert "denoising" in capsys.readouterr().err and steps[-1] == (1, 1)
    assert 0 <= result.seed < 2**31  # -1: a random seed, reported


def test_generate_errors_name_the_field(flux: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="height=33"):
        flux.generate("x", height=33, progress=False)
    with pytest.raises(InvalidRequestError, match="does not take an input image"):
        flux.generate("x", image=Image.new("RGB", (8, 8)), progress=False, **SMALL)
    with pytest.raises(UserError, match="is not available"):
        Engine.from_pretrained(str(CONFIG_DIR / "FLUX.1-dev"), device="cuda:99")


def test_save_images_with_metadata(flux: Engine, tmp_path: Path) -> None:
    result = flux.generate("a 🦊 in the snow", seed=3, num_outputs=2, progress=False, **SMALL)
    paths = result.save(tmp_path / "new" / "fox.png")  # a missing folder is created
    assert paths == [tmp_path / "new" / "fox_0.png", tmp_path / "new" / "fox_1.png"]
    meta = read_metadata(paths[1])
    assert {k: meta[k] for k in ("prompt", "seed", "steps", "guidance_scale", "size")} == {
        "prompt": "a 🦊 in the snow", "seed": "3", "steps": "1", "guidance_scale": "3.5", "size": "32x32"}
    assert meta["model"] == result.model and meta["software"].startswith("diffserve")
    with Image.open(paths[0]) as im:
        assert np.array_equal(np.asarray(im), np.asarray(result.images[0]))
    jpgs = result.save(tmp_path / "fox.jpg")
    assert Image.open(jpgs[0]).format == "JPEG" and read_metadata(jpgs[1])["prompt"] == "a 🦊 in the snow"
    assert all(read_metadata(p) == {} for p in result.save(tmp_path / "bare.png", metadata=False))
    with pytest.raises(InvalidRequestError, match="cannot tell the output format"):
        result.save(tmp_path / "fox.tiff")


def test_save_video_with_metadata(wan_t2v_repo: Path, tmp_path: Path) -> None:
    engine = Engine.from_pretrained(str(wan_t2v_repo), dtype="fp32", device="cpu")
    result = engine.generate("a blue square", negative_prompt="blurry", height=16, width=16, num_frames=5,
                             num_inference_steps=1, fps=8, seed=2, progress=False)
    (mp4,) = result.save(tmp_path / "clip.mp4")
    meta = read_metadata(mp4)
    assert (meta["prompt"], meta["negative_prompt"], meta["seed"], meta["frames"], meta["fps"]) == (
        "a blue square", "blurry", "2", "5", "8")
    (gif,) = result.save(tmp_path / "clip.gif")
    assert read_metadata(gif)["size"] == "16x16"
    (frames,) = result.save(tmp_path / "frames", format="frames")
    assert read_metadata(frames / "frame_00004.png")["seed"] == "2"


def _fake_hub_cache(root: Path) -> Path:
    """A Hugging Face cache holding FLUX.1-schnell's config files as org/schnell, and a non-diffusers repo."""
    snapshot = root / "models--org--schnell" / "snapshots" / "abc123"
    shutil.copytree(CONFIG_DIR / "FLUX.1-schnell", snapshot)
    (root / "models--org--schnell" / "refs").mkdir()
    (root / "models--org--schnell" / "refs" / "main").write_text("abc123")
    (root / "models--org--llm" / "snapshots" / "def456").mkdir(parents=True)
    return root


def test_catalog_lists_embedded_and_cached_models(tmp_path: Path) -> None:
    entries = list_models([str(CONFIG_DIR / "Wan2.1-I2V-14B-480P-Diffusers"), str(tmp_path / "missing")],
                          cache_dir=_fake_hub_cache(tmp_path / "hub"))
    by_name = {e.name: e for e in entries}
    schnell = by_name["org/schnell"].card
    assert schnell is not None and by_name["org/schnell"].source == "hub cache"
    assert (schnell["kind"], schnell["pipeline"], schnell["defaults"]["num_inference_steps"]) == (
        "image", "FluxPipeline", 4)
    assert schnell["accepts"]["size"] == {"multiple": 16, "min": 16, "max": 4096}
    i2v = by_name[str(CONFIG_DIR / "Wan2.1-I2V-14B-480P-Diffusers")].card
    assert i2v["accepts"]["image"]["required"] and i2v["accepts"]["num_frames"] == {"min": 1, "max": 257,
                                                                                    "rule": "4k+1"}
    assert by_name[str(tmp_path / "missing")].card is None and "org/llm" not in by_name
    text = format_catalog(entries)
    assert "org/schnell  [hub cache]  image, FluxPipeline" in text and "1024x1024, 4 steps" in text
    assert "frames 4k+1 in 1-257" in text and "not usable: --model-path" in text


def test_models_command_json(tmp_path: Path, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hub")))
    assert main(["models", "--json"]) == 0
    cards = {c["id"]: c for c in json.loads(capsys.readouterr().out)["data"]}
    assert cards["org/schnell"]["defaults"]["guidance"] == "none"
    assert main(["models"]) == 0
    assert "org/schnell" in capsys.readouterr().out


def test_model_card_keeps_every_default_field(flux: Engine) -> None:
    card = model_card(flux.defaults, model_id="m", pipeline=flux.pipeline_class, created=5)
    assert card["defaults"]["height"] == flux.defaults.height and card["created"] == 5
    assert card["accepts"]["num_inference_steps"] == {"min": 1, "max": 1000}
    json.dumps(card)


def test_busy_port_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", 0)
