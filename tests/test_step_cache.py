"""The step cache (`diffserve.accel.step_cache`) and the fidelity measures (`diffserve.accel.fidelity`).

Cache logic on a toy DiT whose inputs are chosen per step (warm-up, threshold, cap, reset, per-branch state),
then through the real pipelines on the tiny fixtures (threshold 0 and a never-met threshold are bit-exact
with no cache, a huge one reuses after the warm-up, request checks, CLI flags), then 2 gloo processes:
sequence parallelism measures the same changes and takes the same decisions on both ranks as one process,
and CFG parallelism keeps each branch's decisions.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from diffserve.accel.cache_config import StepCacheConfig
from diffserve.accel.fidelity import luminance, psnr, ssim
from diffserve.accel.step_cache import StepCache
from diffserve.config import GenerationRequest
from diffserve.engine.entry import Engine
from diffserve.errors import InvalidRequestError, UserError
from diffserve.parallel.plan import SequencePlan, Tokens
from diffserve.pipelines.base import PipelineState

# ----------------------------------------------------------------------------------------------------------
# Cache logic on a toy DiT


class ToyDiT(nn.Module):
    """Four residual blocks on one segment, the DiT shape the cache needs (`blocks`, `run_blocks`)."""

    PLAN = SequencePlan(joint=("image",), output="image")
    REPEATED_BLOCKS = ("layers",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def run_blocks(self, tokens: Tokens, start: int, stop: int | None) -> Tokens:
        x = tokens.segments["image"]
        for layer in self.layers[start:stop]:
            x = x + torch.tanh(layer(x))
        return tokens.with_segments(image=x)

    def blocks(self, tokens: Tokens) -> Tokens:
        return self.run_blocks(tokens, 0, None)


def _run(cache: StepCache, model: ToyDiT, inputs: list[torch.Tensor], branch: str = "cond") -> list[torch.Tensor]:
    outs = []
    for i, x in enumerate(inputs):
        cache.branch, cache.step = branch, i
        with torch.no_grad():
            outs.append(cache.run(model, Tokens({"image": x})).segments["image"])
    return outs


def _cache(**kw: object) -> StepCache:
    cfg = StepCacheConfig("fbcache", **kw)  # type: ignore[arg-type]
    cache = StepCache(cfg, "image", 4)
    cache.start(cfg)
    return cache


def _reused(cache: StepCache) -> list[bool]:
    return [r for _, _, r in cache.decisions]


@pytest.fixture(scope="module")
def toy() -> ToyDiT:
    return ToyDiT()


def test_warmup_then_cap_on_a_still_input(toy: ToyDiT) -> None:
    x = torch.randn(2, 5, 8)
    cache = _cache(threshold=0.5, warmup_steps=2, max_skip=3)
    outs = _run(cache, toy, [x] * 12)
    assert _reused(cache) == [False, False, True, True, True, False, True, True, True, False, True, True]
    assert cache.hit_fraction() == 8 / 12
    full = toy.blocks(Tokens({"image": x})).segments["image"]
    assert all(torch.allclose(o, full, atol=1e-6) for o in outs)  # same input: the reused residual is exact
    assert cache.changes and max(cache.changes) < 1e-6


def test_threshold_decides(toy: ToyDiT) -> None:
    g = torch.Generator().manual_seed(1)
    jumpy = [torch.randn(2, 5, 8, generator=g) for _ in range(6)]
    cache = _cache(threshold=0.5, warmup_steps=0, max_skip=100)
    _run(cache, toy, jumpy)
    assert not any(_reused(cache)) and min(cache.changes) > 0.5  # unrelated inputs: large changes
    base = torch.randn(2, 5, 8, generator=g)
    drift = [base * (1 + 1e-3 * i) for i in range(6)]
    cache = _cache(threshold=0.05, warmup_steps=1, max_skip=100)
    _run(cache, toy, drift)
    assert _reused(cache) == [False] + [True] * 5
    # the change is measured against the last full step: it grows while the cache is reused
    assert cache.changes == sorted(cache.changes) and cache.changes[-1] < 0.05


def test_threshold_zero_is_off_and_start_resets(toy: ToyDiT) -> None:
    x = torch.randn(1, 3, 8)
    cache = _cache(threshold=0.0, warmup_steps=0)
    outs = _run(cache, toy, [x] * 4)
    assert cache.decisions == [] and cache.hit_fraction() is None
    assert all(torch.equal(o, toy.blocks(Tokens({"image": x})).segments["image"]) for o in outs)
    cache = _cache(threshold=0.5, warmup_steps=0, max_skip=100)
    _run(cache, toy, [x] * 3)
    assert _reused(cache) == [False, True, True]
    cache.start(cache.config)  # a new generation: nothing of the last one is reused
    assert cache.states == {} and cache.calls == 0
    _run(cache, toy, [x * 2] * 2)
    assert _reused(cache) == [False, True]


def test_each_cfg_branch_keeps_its_own_state(toy: ToyDiT) -> None:
    """cond sees the same input every step, uncond a new one: only cond reuses. With one shared state cond
    would be compared with uncond's residual and never reuse."""
    g = torch.Generator().manual_seed(2)
    still = torch.randn(1, 4, 8, generator=g)
    cond, uncond = {"x": still}, {"x": None}
    cfg = StepCacheConfig("fbcache", threshold=0.5, warmup_steps=1, max_skip=100)
    cache = StepCache(cfg, "image", 4)
    state = SimpleNamespace(request=GenerationRequest(prompt="p"), uncond=uncond)

    def predict(x: torch.Tensor, i: int, t: torch.Tensor, c: dict) -> torch.Tensor:
        inp = c["x"] if c["x"] is not None else torch.randn(1, 4, 8, generator=g)
        return cache.run(toy, Tokens({"image": inp})).segments["image"]

    step = cache.begin(state, predict)  # type: ignore[arg-type]
    with torch.no_grad():
        for i in range(5):
            step(still, i, torch.tensor(0.0), cond)
            step(still, i, torch.tensor(0.0), uncond)
    by_branch = {b: [r for bb, _, r in cache.decisions if bb == b] for b in ("cond", "uncond")}
    assert by_branch == {"cond": [False, True, True, True, True], "uncond": [False] * 5}
    assert cache.hit_fraction() == 4 / 10


def test_config_checks() -> None:
    for kw, name in [(dict(mode="teacache"), "mode"), (dict(threshold=-0.1), "cache_threshold"),
                     (dict(threshold=10.5), "cache_threshold"), (dict(warmup_steps=-1), "cache_warmup"),
                     (dict(max_skip=0), "cache_max_skip"), (dict(threshold=float("nan")), "cache_threshold")]:
        with pytest.raises(UserError, match=name):
            StepCacheConfig(**kw)  # type: ignore[arg-type]
    assert StepCacheConfig().label() == "off" and "fbcache 0.1" in StepCacheConfig("fbcache", 0.1).label()


# ----------------------------------------------------------------------------------------------------------
# Through the pipelines (tiny fixtures)

FLUX_KW = dict(height=32, width=32, num_inference_steps=4, seed=3)
# one cache setting for the engines below; requests change the threshold
CACHE = StepCacheConfig("fbcache", threshold=0.08, warmup_steps=1, max_skip=2)


def _pixels(engine: Engine, **kw: object) -> tuple[np.ndarray, float | None]:
    res = engine.generate("a red fox", progress=False, **{**FLUX_KW, **kw})  # type: ignore[arg-type]
    return np.asarray(res.images[0]), res.cache_hit_fraction


@pytest.fixture(scope="module")
def flux_engines(flux_dev_repo: Path) -> tuple[Engine, Engine, np.ndarray]:
    """An engine without a cache, one with, and the first one's output (the reference)."""
    plain = Engine.from_pretrained(str(flux_dev_repo), dtype="fp32", device="cpu")
    cached = Engine.from_pretrained(str(flux_dev_repo), dtype="fp32", device="cpu", step_cache=CACHE)
    ref, hits = _pixels(plain)
    assert hits is None
    return plain, cached, ref


def test_threshold_zero_and_unmet_threshold_are_bit_exact(flux_engines: tuple[Engine, Engine, np.ndarray]) -> None:
    _, cached, ref = flux_engines
    off, hits = _pixels(cached, cache_threshold=0)
    assert hits is None and np.array_equal(off, ref)
    split, hits = _pixels(cached, cache_threshold=1e-12)  # blocks run as first + rest: the same arithmetic
    assert hits == 0.0 and np.array_equal(split, ref)


def test_huge_threshold_reuses_after_warmup(flux_engines: tuple[Engine, Engine, np.ndarray]) -> None:
    _, cached, ref = flux_engines
    out, hits = _pixels(cached, cache_threshold=10.0)
    assert cached.step_cache is not None
    assert [r for _, _, r in cached.step_cache.decisions] == [False, True, True, False]  # warm-up 1, cap 2
    assert hits == 0.5 and 0 < np.abs(out.astype(int) - ref).mean() < 40  # lossy, yet close


def test_request_checks(flux_engines: tuple[Engine, Engine, np.ndarray]) -> None:
    plain, cached, _ = flux_engines
    with pytest.raises(InvalidRequestError, match="cache_threshold=20 is not accepted"):
        cached.generate("a fox", cache_threshold=20, progress=False)
    with pytest.raises(InvalidRequestError, match="started without a step cache"):
        plain.generate("a fox", cache_threshold=0.1, progress=False)
    with pytest.raises(InvalidRequestError, match="cache_threshold"):
        plain.validate(GenerationRequest(prompt="a fox", cache_threshold=0.1))


def test_cli_flags(flux_dev_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from diffserve.cli import main
    from diffserve.cli_args import add_engine_args, step_cache_options

    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = step_cache_options(p.parse_args(["--step-cache", "fbcache", "--cache-threshold", "0.2",
                                           "--cache-max-skip", "5"]))["step_cache"]
    assert cfg == StepCacheConfig("fbcache", threshold=0.2, max_skip=5)
    with pytest.raises(UserError, match="--cache-warmup needs --step-cache"):
        step_cache_options(p.parse_args(["--cache-warmup", "3"]))
    assert main(["generate", "--model-path", str(flux_dev_repo), "--prompt", "a fox", "--height", "32", "--width",
                 "32", "--num-inference-steps", "2", "--dtype", "fp32", "--device", "cpu", "--step-cache", "fbcache",
                 "--cache-threshold", "10", "--cache-warmup", "1", "--output-dir", str(tmp_path)]) == 0
    assert re.search(r"step cache: 50% of the model calls reused it", capsys.readouterr().err)


def test_server_request_carries_cache_threshold_to_the_worker(tmp_path: Path) -> None:
    """The real app over a stub worker: `cache_threshold` in the body (OpenAI's extra_body) is validated and
    reaches the work item the worker runs."""
    from diffserve.config import ModelDefaults
    from diffserve.server.messages import WorkerConfig
    from diffserve.server.testing import stub_app

    http, _, items = stub_app(tmp_path, ModelDefaults(kind="image", height=64, width=64, num_inference_steps=4,
                                                      guidance_scale=0.0))
    ok = http.post("/v1/images/generations", json={"prompt": "a fox", "cache_threshold": 0.2})
    assert ok.status_code == 200 and items[-1].request.cache_threshold == 0.2
    for bad in (20, "high"):
        r = http.post("/v1/images/generations", json={"prompt": "a fox", "cache_threshold": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_threshold", r.text
    assert WorkerConfig("m", step_cache=CACHE).step_cache == CACHE  # what the worker builds its engine with


# ----------------------------------------------------------------------------------------------------------
# Two gloo processes: the decision under sequence and CFG parallelism

# 7 text + 15 image tokens: the image segment is padded on the second rank
SP_REQUEST = {"prompt": "a red fox", "height": 20, "width": 12, "num_inference_steps": 3, "seed": 5,
              "max_sequence_length": 7, "cache_threshold": 10.0}
CFG_REQUEST = {"prompt": "a red fox", "negative_prompt": "blurry", "height": 48, "width": 16, "num_frames": 9,
               "num_inference_steps": 3, "seed": 5, "max_sequence_length": 8, "cache_threshold": 10.0}


def _generate(engine: Engine, request: dict) -> tuple[torch.Tensor, list, list[float]]:
    state = PipelineState(requests=[GenerationRequest(**request)], device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        engine.pipeline(state)
    cache = engine.step_cache
    assert cache is not None
    return state.pixels, list(cache.decisions), list(cache.changes)  # type: ignore[return-value]


def _layout_result(path: str, request: dict, ulysses: int, cfg: bool) -> dict:
    from diffserve.engine.ranks import parallelize_pipeline
    from diffserve.parallel.mesh import ParallelConfig, build_mesh_groups

    ref_pixels, ref_decisions, ref_changes = _generate(
        Engine.from_pretrained(path, dtype="fp32", device="cpu", step_cache=CACHE), request)
    engine = Engine.from_pretrained(path, dtype="fp32", device="cpu", step_cache=CACHE)
    layout = ParallelConfig(num_gpus=2, ulysses_degree=ulysses, cfg_parallel=cfg)
    parallelize_pipeline(engine.pipeline, engine.attention, build_mesh_groups(layout.resolve()))
    pixels, decisions, changes = _generate(engine, request)
    everyone: list = [None, None]
    dist.all_gather_object(everyone, decisions)
    mine = {b for b, _, _ in decisions}
    return {"pixel_error": float((pixels - ref_pixels).abs().max()), "same_on_ranks": everyone[0] == everyone[1],
            "decisions": [list(d) for d in decisions],
            "single": [list(d) for d in ref_decisions if d[0] in mine],
            "changes": changes, "single_changes": ref_changes if not cfg else []}


def _cache_worker(rank: int, out_file: str, flux: str, wan: str) -> None:
    results = {"sp": _layout_result(flux, SP_REQUEST, 2, False), "cfg": _layout_result(wan, CFG_REQUEST, 1, True)}
    Path(f"{out_file}.{rank}").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory: pytest.TempPathFactory, flux_dev_repo: Path, wan_t2v_repo: Path) -> list:
    from diffserve.engine.ranks import spawn_world

    out = tmp_path_factory.mktemp("step_cache") / "results.json"
    spawn_world(_cache_worker, 2, str(out), str(flux_dev_repo), str(wan_t2v_repo))
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def test_sequence_parallel_decides_as_one_process(parallel_results: list) -> None:
    for res in (r["sp"] for r in parallel_results):
        assert res["same_on_ranks"] and res["decisions"] == res["single"]
        assert [r for _, _, r in res["decisions"]] == [False, True, True]
        assert np.allclose(res["changes"], res["single_changes"], rtol=1e-4)  # padding left out of the sums
        assert res["pixel_error"] < 1e-4


def test_cfg_parallel_keeps_each_branch_decisions(parallel_results: list) -> None:
    branches = [{b for b, _, _ in r["cfg"]["decisions"]} for r in parallel_results]
    assert branches == [{"cond"}, {"uncond"}]  # rank 0 runs the conditional branch, rank 1 the other
    for res in (r["cfg"] for r in parallel_results):
        assert res["decisions"] == res["single"] and any(r for _, _, r in res["decisions"])
        assert res["pixel_error"] < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Fidelity


def test_psnr() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(50, 200, (32, 48, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf
    signs = np.where(rng.random(a.shape) < 0.5, -5, 5)
    b = (a.astype(int) + signs).astype(np.uint8)  # every value off by exactly 5: MSE 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:, :10])
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a.astype(np.float32))


def _ssim_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM as scikit-image computes it (Gaussian sigma 1.5 truncated at 3.5 sigma, population statistics,
    borders of half a window cropped), written independently with scipy.ndimage."""
    from scipy.ndimage import gaussian_filter

    x, y = luminance(a), luminance(b)

    def f(v: np.ndarray) -> np.ndarray:
        return gaussian_filter(v, 1.5, truncate=3.5)

    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_ssim() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, noisy) == pytest.approx(_ssim_scipy(a, noisy), abs=1e-9)
    assert 0 < ssim(a, noisy) < 0.99
    # two flat images: only the luminance term is left, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    c1 = (0.01 * 255) ** 2
    flat = ssim(np.full((16, 16), 100, np.uint8), np.full((16, 16), 120, np.uint8))
    assert flat == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    assert ssim(a, 255 - a) < 0  # an inverted image is anti-correlated
    video = np.stack([a, noisy])  # (F, H, W, 3): the mean over frames
    assert ssim(video, np.stack([a, a])) == pytest.approx((1.0 + ssim(noisy, a)) / 2)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:8, :8], a[:8, :8])


def test_bench_harness_cache_engines() -> None:
    from benchmarks.bench_e2e import fidelity_vs, parse_engine, step_cache_config

    spec = parse_engine("diffserve+compile+fbcache0.12w1m5[fa3]")
    assert spec.compile and spec.backend == "fa3" and spec.cache == (0.12, 1, 5)
    assert step_cache_config(spec) == StepCacheConfig("fbcache", threshold=0.12, warmup_steps=1, max_skip=5)
    assert step_cache_config(parse_engine("diffserve+compile")).mode == "none"
    with pytest.raises(SystemExit, match="unknown engine"):
        parse_engine("diffusers+fbcache0.1")
    a = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    fid = fidelity_vs({"ref": a, "same": a.copy(), "inverted": 255 - a}, "ref")
    assert fid["same"] == {"psnr_db": math.inf, "ssim": 1.0} and fid["inverted"]["ssim"] < 0
