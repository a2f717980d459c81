"""`--compile` (regional torch.compile of the repeated transformer blocks) on the CPU: same picture as eager
within a pixel level, and the compiled kernels land in diffserve's persistent cache folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffserve import Engine
from diffserve.cli import main


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on a CPU needs a C++ compiler")
def test_compiled_blocks_match_eager_and_cache_kernels(flux_dev_repo: Path, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kw = dict(height=64, width=64, num_inference_steps=2, seed=0)
    eager = Engine.from_pretrained(str(flux_dev_repo), dtype="fp32", device="cpu")
    a = np.asarray(eager.generate("a red circle", **kw).images[0], dtype=int)
    compiled = Engine.from_pretrained(str(flux_dev_repo), dtype="fp32", device="cpu", compile=True)
    t = compiled.pipeline.components.transformer
    assert compiled.compiled_blocks == len(t.transformer_blocks) + len(t.single_transformer_blocks)
    b = np.asarray(compiled.generate("a red circle", **kw).images[0], dtype=int)
    assert np.abs(a - b).max() <= 2  # fp32 kernels fused and reordered by inductor
    cache = tmp_path / "cache" / "diffserve" / "inductor"
    assert cache.is_dir() and any(cache.rglob("*"))

    out = tmp_path / "out"
    assert main(["generate", "--model-path", str(flux_dev_repo), "--prompt", "a red circle", "--height", "64",
                 "--width", "64", "--num-inference-steps", "2", "--seed", "0", "--dtype", "fp32", "--compile",
                 "--output-dir", str(out)]) == 0
    assert f"kernels are cached in {cache}" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 1
