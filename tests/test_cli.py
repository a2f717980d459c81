"""`diffserve generate` end to end: the installed console command, defaults, errors (exit 2, one line)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffserve.cli import main


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("diffserve")
    cmd = [exe] if exe else [sys.executable, "-m", "diffserve.cli"]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_writes_images(flux_dev_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli("generate", "--model-path", str(flux_dev_repo), "--prompt", "a red circle", "--height", "32",
                "--width", "48", "--num-inference-steps", "2", "--seed", "5", "--num-outputs", "2",
                "--output-dir", str(out), "--output-format", "webp", "--dtype", "fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = [Path(line) for line in proc.stdout.split()]
    assert len(written) == 2 and all(p.suffix == ".webp" and p.is_file() for p in written)
    assert Image.open(written[0]).size == (48, 32)
    assert "denoising" in proc.stderr and "seed 5" in proc.stderr and "text_encoding" in proc.stderr


def test_generate_help_documents_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model-path", "--prompt", "--negative-prompt", "--height", "--width", "--num-inference-steps",
                 "--guidance-scale", "--seed", "--num-outputs", "--output-dir", "--output-path", "--output-format",
                 "--dtype", "--device", "--num-frames", "--fps", "--image-path"):
        assert flag in text


def test_output_path_and_default_dir(flux_dev_repo: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "pic.jpeg"
    assert main(["generate", "--model-path", str(flux_dev_repo), "--prompt", "x", "--height", "32", "--width", "32",
                 "--num-inference-steps", "1", "--output-path", str(target), "--dtype", "fp32"]) == 0
    assert Image.open(target).format == "JPEG"
    assert main(["generate", "--model-path", str(flux_dev_repo), "--prompt", "x", "--height", "32", "--width", "32",
                 "--num-inference-steps", "1", "--dtype", "fp32"]) == 0
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 1


@pytest.mark.parametrize("extra,needle", [
    (["--height", "33"], "height=33"),
    (["--width", "100000"], "width=100000"),
    (["--num-inference-steps", "0"], "num_inference_steps=0"),
    (["--prompt", "   "], "prompt must be a non-empty string"),
    (["--num-outputs", "0"], "num_outputs=0"),
    (["--num-frames", "9"], "num_frames"),
    (["--output-dir", "/proc/nope"], ""),
])
def test_bad_input_exits_2_with_one_line(flux_dev_repo: Path, tmp_path: Path, capsys, extra, needle) -> None:
    args = ["generate", "--model-path", str(flux_dev_repo), "--prompt", "a cat", "--num-inference-steps", "1",
            "--height", "32", "--width", "32", "--dtype", "fp32", "--output-dir", str(tmp_path / "o")]
    args += extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffserve: error:") and needle in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_model_path_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model-path", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["generate", "--model-path", str(tmp_path), "--prompt", "x"]) == 2
    assert "model_index.json" in capsys.readouterr().err
