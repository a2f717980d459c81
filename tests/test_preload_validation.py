"""Every check that needs no weights runs from the checkpoint's config files before any weight is read
(issue 16, item 3). Two kinds of repos show it: the tiny FLUX fixture with its weight reader slowed down
(each DiT weight file takes seconds to read, and every read is recorded), and the real checkpoints' config
files with no weights at all (`diffserve/testing/model_configs`: FLUX.1-dev's 12B transformer is not
there, so only a run that never reads weights gets as far as the check)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffserve import cli
from diffserve.cli import main
from diffserve.config import GenerationRequest
from diffserve.models import loader
from diffserve.models.loader import read_model_index
from diffserve.pipelines.registry import RECIPES, defaults_from_configs, validate_from_configs
from diffserve.testing.fixtures import CONFIG_DIR

SLOW_READ_S = 2.0
FLUX_CONFIGS = CONFIG_DIR / "FLUX.1-dev"
I2V_CONFIGS = CONFIG_DIR / "Wan2.1-I2V-14B-480P-Diffusers"


@pytest.fixture
def slow_weights(monkeypatch) -> list[str]:
    """Make reading a DiT's safetensors take SLOW_READ_S seconds; returns the files read, in order."""
    reads: list[str] = []
    real = loader.load_file

    def slow_load_file(path, device="cpu"):
        reads.append(str(path))
        time.sleep(SLOW_READ_S)
        return real(path, device=device)

    monkeypatch.setattr(loader, "load_file", slow_load_file)
    return reads


def _timed(args: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    rc = main(args)
    return rc, time.perf_counter() - start


def test_bad_height_fails_fast_without_reading_weights(flux_dev_repo: Path, tmp_path: Path, capsys,
                                                       slow_weights: list[str]) -> None:
    base = ["generate", "--model-path", str(flux_dev_repo), "--prompt", "a fox", "--num-inference-steps", "1",
            "--dtype", "fp32", "--output-dir", str(tmp_path / "o")]
    cli._quiet_libraries()  # imported once, outside the timings
    rc_bad, bad_s = _timed([*base, "--height", "33"])
    err = capsys.readouterr().err.strip().splitlines()
    reads_bad = list(slow_weights)
    rc_ok, ok_s = _timed([*base, "--height", "32", "--width", "32"])  # control: the same run, a good height
    print(f"bad --height: exit {rc_bad} after {bad_s:.2f} s, {len(reads_bad)} weight reads; good: exit {rc_ok} "
          f"after {ok_s:.2f} s, {len(slow_weights)} weight read(s) of {SLOW_READ_S:g} s")
    assert rc_bad == 2 and reads_bad == [] and bad_s < SLOW_READ_S / 2
    assert err[-1] == "diffserve: error: height=33 is not accepted: it must be a multiple of 4 between 4 and 4096"
    assert rc_ok == 0 and slow_weights and ok_s >= SLOW_READ_S
    assert not (tmp_path / "o").exists() or len(list((tmp_path / "o").iterdir())) == 1


def test_bad_height_on_full_size_configs_without_weights(capsys) -> None:
    """FLUX.1-dev's real configs, none of its weights: the size rule (multiple of 16) comes from them."""
    assert main(["generate", "--model-path", str(FLUX_CONFIGS), "--prompt", "a fox", "--height", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("diffserve: error: height=1000 is not accepted: it must be a multiple of 16 between 16 "
                       "and 4096")


@pytest.fixture
def no_loading(monkeypatch) -> list[str]:
    """Make the CLI's one loading step record and refuse (in case a check came after it)."""
    calls: list[str] = []

    def refuse(args, model_path):
        calls.append(model_path)
        raise AssertionError("the engine was loaded before the checks")

    monkeypatch.setattr(cli, "_load_engine", refuse)
    return calls


@pytest.mark.parametrize("extra,needle", [
    (["--num-inference-steps", "0"], "num_inference_steps=0"),
    (["--num-frames", "9"], "num_frames is only accepted by video models"),
    (["--negative-prompt", "blurry"], "does not use a negative prompt"),
    (["--guidance-scale", "101"], "guidance_scale=101.0"),
    (["--max-sequence-length", "600"], "max_sequence_length=600"),
    (["--seed", "-2"], "seed=-2"),
    (["--num-outputs", "17"], "num_outputs=17"),
    (["--output-format", "mp4"], "image output format 'mp4' is not accepted"),
    (["--output-path", "x.txt"], "extension '.txt'"),
    (["--output-dir", "/proc/nope"], "/proc/nope"),
    (["--image-path", "IMAGE"], "does not take an input image"),
    (["--device", "nonsense:0"], "is not a device name"),
])
def test_request_and_output_checks_come_before_loading(tmp_path: Path, capsys, no_loading, extra,
                                                       needle) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IMAGE" else a for a in extra]
    assert main(["generate", "--model-path", str(FLUX_CONFIGS), "--prompt", "a fox", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffserve: error:") and needle in err[-1], err[-1]
    assert no_loading == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(capsys, no_loading) -> None:
    assert main(["generate", "--model-path", str(FLUX_CONFIGS), "--prompt", "a fox", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffserve: error: device 'cuda' is not available")
    assert no_loading == []


def test_image_required_and_prompt_file_lines(tmp_path: Path, capsys, no_loading) -> None:
    base = ["generate", "--model-path", str(I2V_CONFIGS), "--output-dir", str(tmp_path / "o")]
    assert main([*base, "--prompt", "a fox"]) == 2
    assert "needs an input image" in capsys.readouterr().err
    Image.new("RGB", (64, 36)).save(tmp_path / "in.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\n" + '{"prompt": "a cat", "num_frames": 8}\n')
    assert main([*base, "--prompt-file", str(prompts), "--image-path", str(tmp_path / "in.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"diffserve: error: {prompts}:3: num_frames=8 is not accepted"), err
    prompts.write_text('{"prompt": "a cat", "steps": 4}\n')
    assert main([*base, "--prompt-file", str(prompts)]) == 2
    assert f"{prompts}:1: unknown keys ['steps']" in capsys.readouterr().err
    prompts.write_text('{"prompt": "a cat",\n')
    assert main([*base, "--prompt-file", str(prompts)]) == 2
    assert f"{prompts}:1: not valid JSON" in capsys.readouterr().err
    assert no_loading == []


# Each reference pipeline's defaults (diffusers' __call__ defaults and derived sizes; model_configs/SOURCES.md),
# as read from the real config files alone.
REFERENCE = {
    "FLUX.1-dev": ("image", 1024, 1024, 28, 3.5, 16, None),
    "FLUX.1-schnell": ("image", 1024, 1024, 4, 0.0, 16, None),
    "Wan2.1-T2V-1.3B-Diffusers": ("video", 480, 832, 50, 5.0, 16, 81),
    "Wan2.1-I2V-14B-480P-Diffusers": ("video", 480, 832, 50, 5.0, 16, 81),
    "HunyuanVideo": ("video", 720, 1280, 50, 6.0, 16, 129),
    "Qwen-Image": ("image", 1024, 1024, 50, 4.0, 16, None),
    "Qwen-Image-Edit": ("image", 1024, 1024, 50, 4.0, 16, None),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_defaults_from_real_configs(name: str) -> None:
    d = defaults_from_configs(read_model_index(CONFIG_DIR / name))
    got = (d.kind, d.height, d.width, d.num_inference_steps, d.guidance_scale, d.size_multiple, d.num_frames)
    assert got == REFERENCE[name]


def test_every_supported_class_has_a_config_reader() -> None:
    assert all(callable(r.build) and callable(r.input_stage) for r in RECIPES.values())


@pytest.mark.parametrize("repo_fixture", ["flux_dev_repo", "wan_i2v_repo"])
def test_loaded_pipeline_has_the_config_defaults(repo_fixture: str, request) -> None:
    from diffserve import Engine

    root = request.getfixturevalue(repo_fixture)
    engine = Engine.from_pretrained(str(root), dtype="fp32", device="cpu")
    assert engine.defaults == defaults_from_configs(read_model_index(root))


@pytest.mark.parametrize("size,expected", [((1024, 576), (832, 464)), ((576, 1024), (464, 832)),
                                           ((832, 480), (832, 480))])
def test_i2v_size_follows_the_input_image(size: tuple[int, int], expected: tuple[int, int]) -> None:
    """Wan I2V without a size: the input's aspect ratio within 480x832 pixels, each side rounded down to the
    multiple of 16 (diffusers' Wan I2V example: round(sqrt(area * h/w)) // 16 * 16)."""
    index = read_model_index(I2V_CONFIGS)
    (req,) = validate_from_configs(index, [GenerationRequest(prompt="x", image=Image.new("RGB", size))])
    assert (req.width, req.height) == expected
    (req,) = validate_from_configs(index, [GenerationRequest(prompt="x", image=Image.new("RGB", size), height=480,
                                                             width=480)])
    assert (req.width, req.height) == (480, 480)
