"""`diffserve generate` end to end: the installed console command, defaults, errors (exit 2, one line)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffserve.cli import main


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("diffserve")
    cmd = [exe] if exe else [sys.executable, "-m", "diffserve.cli"]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
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
    assert "denoising" in proc.stderr and "text_encoding" in proc.stderr
    assert f"seed 5: {written[0]}" in proc.stderr and f"seed 6: {written[1]}" in proc.stderr  # one seed each


def test_prompt_file_numbered_output_path_and_metadata(flux_dev_repo: Path, tmp_path: Path, capsys) -> None:
    from diffserve.media import read_metadata

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle\n\n{"prompt": "a blue square", "seed": 7, "num_outputs": 2, "width": 48}\n'
                       'a green triangle\n')
    common = ["--model-path", str(flux_dev_repo), "--height", "32", "--width", "32", "--num-inference-steps", "1",
              "--dtype", "fp32"]
    target = tmp_path / "new" / "x.png"  # its folder does not exist yet
    assert main(["generate", *common, "--prompt-file", str(prompts), "--seed", "3", "--output-path", str(target)]) == 0
    out, err = capsys.readouterr()
    paths = [Path(line) for line in out.split()]
    assert paths == [tmp_path / "new" / f"x_{i}.png" for i in range(4)]
    assert all(f"seed {s}: {p}" in err for s, p in zip((3, 7, 8, 9), paths))
    metas = [read_metadata(p) for p in paths]
    assert [(m["prompt"], m["seed"], m["size"]) for m in metas] == [
        ("a red circle", "3", "32x32"), ("a blue square", "7", "48x32"), ("a blue square", "8", "48x32"),
        ("a green triangle", "9", "32x32")]
    assert metas[0]["steps"] == "1" and metas[0]["model"] == flux_dev_repo.name
    # any output is made again alone from its printed seed; --no-metadata leaves the file bare
    again = tmp_path / "again.png"
    assert main(["generate", *common, "--width", "48", "--prompt", "a blue square", "--seed", "8", "--output-path",
                 str(again), "--no-metadata"]) == 0
    a, b = (np.asarray(Image.open(p), dtype=int) for p in (again, paths[2]))
    assert np.abs(a - b).max() <= 1 and read_metadata(again) == {}


@pytest.mark.parametrize("args,hint", [
    (["--promt", "x"], "did you mean --prompt?"),
    (["--prompt", "x", "--steps", "4"], "did you mean --num-inference-steps?"),
    (["--prompt", "x", "--output-format", "pgn"], "did you mean png?"),
])
def test_mistyped_flag_gets_a_did_you_mean(args: list[str], hint: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(hint)


def test_generate_help_documents_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model-path", "--prompt", "--negative-prompt", "--height", "--width", "--num-inference-steps",
                 "--guidance-scale", "--seed", "--num-outputs", "--output-dir", "--output-path", "--output-format",
                 "--dtype", "--device", "--num-frames", "--fps", "--image-path", "--prompt-file", "--no-metadata"):
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


def test_generate_video_formats(wan_t2v_repo: Path, tmp_path: Path) -> None:
    import av

    for fmt, check in (("mp4", "file"), ("gif", "file"), ("frames", "dir")):
        target = tmp_path / fmt
        args = ["generate", "--model-path", str(wan_t2v_repo), "--prompt", "a blue square moving to the right",
                "--height", "16", "--width", "32", "--num-frames", "9", "--num-inference-steps", "2", "--seed", "1",
                "--output-dir", str(target), "--output-format", fmt, "--fps", "8", "--dtype", "fp32"]
        assert main(args) == 0
        (written,) = list(target.iterdir())
        if fmt == "mp4":
            with av.open(str(written)) as c:
                stream = c.streams.video[0]
                frames = list(c.decode(stream))
                assert stream.codec_context.name == "h264" and len(frames) == 9
                assert (frames[0].width, frames[0].height) == (32, 16) and stream.average_rate == 8
        elif fmt == "frames":
            assert written.is_dir() and len(list(written.glob("frame_*.png"))) == 9
        else:
            assert Image.open(written).n_frames == 9


def test_generate_image_to_video_from_file_and_data_uri(wan_i2v_repo: Path, tmp_path: Path) -> None:
    import base64
    import io

    img = Image.new("RGB", (40, 24), (200, 30, 30))
    path = tmp_path / "in.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for source in (str(path), uri):
        out = tmp_path / f"v{len(source) % 7}.mp4"
        assert main(["generate", "--model-path", str(wan_i2v_repo), "--prompt", "the square moves",
                     "--image-path", source, "--height", "16", "--width", "32", "--num-frames", "5",
                     "--num-inference-steps", "2", "--output-path", str(out), "--dtype", "fp32"]) == 0
        assert out.stat().st_size > 0


def test_image_to_video_errors(wan_i2v_repo: Path, tmp_path: Path, capsys) -> None:
    base = ["generate", "--model-path", str(wan_i2v_repo), "--prompt", "x", "--height", "16", "--width", "32",
            "--num-frames", "5", "--num-inference-steps", "1", "--dtype", "fp32", "--output-dir", str(tmp_path / "o")]
    assert main(base) == 2
    assert "needs an input image" in capsys.readouterr().err
    (tmp_path / "notimage.png").write_text("hello")
    assert main(base + ["--image-path", str(tmp_path / "notimage.png")]) == 2
    assert "image" in capsys.readouterr().err.lower()
    assert main(base + ["--image-path", str(tmp_path / "missing.png")]) == 2
    assert main(base + ["--num-frames", "8", "--image-path", str(tmp_path / "notimage.png")]) == 2


def test_no_model_path_without_embedded_model_is_a_clear_error(capsys, monkeypatch) -> None:
    import diffserve.embedded as emb

    monkeypatch.setattr(emb, "EMBEDDED", {"image": Path("/nonexistent/a"), "video": Path("/nonexistent/b")})
    assert main(["generate", "--prompt", "a red circle", "--num-frames", "9"]) == 2
    err = capsys.readouterr().err
    assert "no embedded video model" in err and "--model-path" in err


def test_no_model_path_uses_embedded_model(flux_dev_repo: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import diffserve.embedded as emb

    monkeypatch.setattr(emb, "EMBEDDED", {"image": flux_dev_repo, "video": Path("/nonexistent")})
    assert main(["generate", "--prompt", "a red circle", "--height", "32", "--width", "32",
                 "--num-inference-steps", "1", "--output-dir", str(tmp_path), "--dtype", "fp32"]) == 0
    assert "using the embedded image model" in capsys.readouterr().err
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_embedded_aliases_name_the_shipped_models() -> None:
    import diffserve.embedded as emb

    for kind in ("image", "video"):
        if emb.embedded_model(kind) is not None:
            assert emb.resolve_model_arg(f"embedded:{kind}", "image") == str(emb.EMBEDDED[kind])
    assert emb.resolve_model_arg("org/name", "video") == "org/name"
