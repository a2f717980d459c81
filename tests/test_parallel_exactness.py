"""Sequence / CFG parallel layouts give the single-process result (fp32, gloo on CPU).

One world of 4 processes is spawned once for the module; inside it every layout gets its own process
groups (2-process layouts run as two replicas, i.e. on ranks {0,1} and {2,3} at the same time). Each rank
compares its output with a single-process run done in the same process and the largest error over all
ranks is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from diffserve.config import GenerationRequest
from diffserve.engine.entry import Engine
from diffserve.engine.ranks import parallelize_pipeline, spawn_world
from diffserve.errors import UserError
from diffserve.layers.attention import sdpa_attention
from diffserve.layers.parallel import USPAttention
from diffserve.parallel.cfg import install_cfg_parallel
from diffserve.parallel.mesh import ParallelConfig, build_mesh_groups
from diffserve.parallel.sequence import segments_layout, take_shard
from diffserve.pipelines.base import PipelineState

WORLD = 4
TOL = 1e-4  # fp32; the measured errors are printed (~1e-6)


def _layout(u: int, r: int, cfg: bool = False) -> ParallelConfig:
    rep = u * r * (2 if cfg else 1)
    return ParallelConfig(num_gpus=WORLD, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg,
                          dp_size=WORLD // rep)


ATTENTION_LAYOUTS = {"U2": (2, 1), "R2": (1, 2), "U2xR2": (2, 2), "U4": (4, 1), "R4": (1, 4)}
FLUX_LAYOUTS = {"U2": (2, 1, False), "R2": (1, 2, False), "U2xR2": (2, 2, False), "R4": (1, 4, False)}
WAN_LAYOUTS = {"U2": (2, 1, False), "R2": (1, 2, False), "CFG2": (1, 1, True), "CFG2xU2": (2, 1, True),
               "CFG2xR2": (1, 2, True), "U2xR2": (2, 2, False)}
# 7 text + 15 image tokens: divisible by neither 2 nor 4
FLUX_REQUEST = {"prompt": "a red fox", "height": 20, "width": 12, "num_inference_steps": 2, "seed": 5,
                "num_outputs": 2, "max_sequence_length": 7}
# 3x3x1 = 9 video tokens
WAN_REQUEST = {"prompt": "a red fox", "negative_prompt": "blurry", "height": 48, "width": 16, "num_frames": 9,
               "num_inference_steps": 2, "seed": 5, "max_sequence_length": 8}
I2V_LAYOUTS = {"CFG2xU2": (2, 1, True), "U2xR2": (2, 2, False)}  # + image-token cross-attention (added K/V)
FUSED_LAYOUTS = {"U2xR2": (2, 2, False)}  # with fuse=True (fused projections and epilogues, split proj_out)


def _world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _attention_errors(u: int, r: int) -> dict[str, float]:
    """USP attention of random q/k/v vs full SDPA, for several lengths, segmentations and head counts."""
    groups = build_mesh_groups(_layout(u, r).resolve())
    usp = USPAttention(groups.ulysses, groups.ring)
    sp, me = groups.sp.size, groups.sp.rank
    errors: dict[str, float] = {}
    for segments in ([1], [3], [5], [8], [13], [3, 5], [7, 15]):
        for heads in (2, 4, 6):
            if heads % u:
                continue
            g = torch.Generator().manual_seed(len(segments) * 100 + sum(segments) + heads)
            q, k, v = (torch.randn(2, sum(segments), heads, 8, generator=g) for _ in range(3))
            ref = sdpa_attention(q, k, v)

            def shard(x: torch.Tensor, segments: list[int] = segments) -> torch.Tensor:
                parts, start = [], 0
                for n in segments:
                    parts.append(take_shard(x[:, start:start + n], 1, me, sp))
                    start += n
                return torch.cat(parts, 1)

            layout = segments_layout(segments, sp)
            with usp.sharded(layout, q.device):
                out = usp(shard(q), shard(k), shard(v), sdpa_attention)
            full = torch.ones(layout.local_len, dtype=torch.bool)
            valid = full if layout.valid is None else layout.valid[me]
            err = (out - shard(ref))[:, valid].abs().max().item() if valid.any() else 0.0
            errors[f"L={'+'.join(map(str, segments))},H={heads}"] = _world_max(err)
    try:  # heads not divisible by the Ulysses degree: a clear error before any communication
        with usp.sharded(segments_layout([4], sp), torch.device("cpu")):
            usp(*(torch.zeros(1, 1, 3, 8) for _ in range(3)), sdpa_attention)
        errors["heads_error"] = "no error" if u > 1 else "ok"  # type: ignore[assignment]
    except ValueError as e:
        errors["heads_error"] = str(e)  # type: ignore[assignment]
    return errors


def _outputs(engine: Engine, request: dict) -> tuple[torch.Tensor, torch.Tensor]:
    state = PipelineState(requests=[GenerationRequest(**request)], device=torch.device("cpu"),
                          dtype=torch.float32)
    with torch.inference_mode():
        engine.pipeline(state)
    return state.latents.float(), state.pixels  # type: ignore[union-attr,return-value]


def _pipeline_errors(path: str, request: dict, layouts: dict, fuse: bool = False) -> dict[str, object]:
    """`fuse`: both the reference and the layouts run with the kernel fusions (the compiled GPU path's)."""
    load = dict(dtype="fp32", device="cpu", fuse=fuse)
    ref_latents, ref_pixels = _outputs(Engine.from_pretrained(path, **load), request)
    out: dict[str, object] = {}
    for name, (u, r, cfg) in layouts.items():
        engine = Engine.from_pretrained(path, **load)
        groups = build_mesh_groups(_layout(u, r, cfg).resolve())
        parallelize_pipeline(engine.pipeline, engine.attention, groups)
        latents, pixels = _outputs(engine, request)
        out[name] = {"latents": _world_max((latents - ref_latents).abs().max().item()),
                     "pixels": _world_max((pixels - ref_pixels).abs().max().item())}
    return out


def _exactness_worker(rank: int, out_file: str, flux: str, wan: str, i2v: str) -> None:
    results: dict[str, object] = {
        "attention": {name: _attention_errors(u, r) for name, (u, r) in ATTENTION_LAYOUTS.items()}}
    results["flux"] = _pipeline_errors(flux, FLUX_REQUEST, FLUX_LAYOUTS)
    results["wan"] = _pipeline_errors(wan, WAN_REQUEST, WAN_LAYOUTS)
    image = Image.fromarray((np.random.RandomState(0).rand(24, 40, 3) * 255).astype(np.uint8))
    results["wan-i2v"] = _pipeline_errors(i2v, {**WAN_REQUEST, "image": image}, I2V_LAYOUTS)
    results["flux-fused"] = _pipeline_errors(flux, FLUX_REQUEST, FUSED_LAYOUTS, fuse=True)
    results["wan-fused"] = _pipeline_errors(wan, WAN_REQUEST, {"CFG2xU2": WAN_LAYOUTS["CFG2xU2"]}, fuse=True)
    engine = Engine.from_pretrained(flux, dtype="fp32", device="cpu")
    try:  # FLUX has no CFG branch
        install_cfg_parallel(engine.pipeline, build_mesh_groups(_layout(1, 1, True).resolve()).cfg,
                             engine.defaults.uses_negative_prompt)
        results["flux_cfg_error"] = "no error"
    except UserError as e:
        results["flux_cfg_error"] = str(e)
    try:  # 2 heads cannot be split 4 ways
        parallelize_pipeline(engine.pipeline, engine.attention, build_mesh_groups(_layout(4, 1).resolve()))
        results["flux_u4_error"] = "no error"
    except ValueError as e:
        results["flux_u4_error"] = str(e)
    if rank == 0:
        Path(out_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from diffserve.testing.fixtures import fixture_path

    out = tmp_path_factory.mktemp("parallel") / "results.json"
    repos = [str(fixture_path(name)) for name in ("flux-dev", "wan-t2v", "wan-i2v")]
    spawn_world(_exactness_worker, WORLD, str(out), *repos)
    res = json.loads(out.read_text())
    for family in ("flux", "wan", "wan-i2v", "flux-fused", "wan-fused"):
        for name, err in res[family].items():
            print(f"{family} {name}: max |latents - single| = {err['latents']:.2e}, "
                  f"max |pixels - single| = {err['pixels']:.2e}")
    for name, errs in res["attention"].items():
        worst = max(v for v in errs.values() if isinstance(v, float))
        print(f"attention {name}: max error {worst:.2e} over {len(errs) - 1} cases")
    return res


@pytest.mark.parametrize("layout", list(ATTENTION_LAYOUTS))
def test_attention_matches_sdpa(results: dict, layout: str) -> None:
    errs = results["attention"][layout]
    for case, err in errs.items():
        if case != "heads_error":
            assert err < 1e-5, f"{layout} {case}: {err}"
    u = ATTENTION_LAYOUTS[layout][0]
    if u > 1:
        assert "does not divide the model's 3 attention heads" in errs["heads_error"]


@pytest.mark.parametrize("layout", list(FLUX_LAYOUTS))
def test_flux_layouts_match_single_process(results: dict, layout: str) -> None:
    err = results["flux"][layout]
    assert err["latents"] < TOL and err["pixels"] < TOL, err


@pytest.mark.parametrize("layout", list(WAN_LAYOUTS))
def test_wan_layouts_match_single_process(results: dict, layout: str) -> None:
    err = results["wan"][layout]
    assert err["latents"] < TOL and err["pixels"] < TOL, err


@pytest.mark.parametrize("layout", list(I2V_LAYOUTS))
def test_wan_i2v_layouts_match_single_process(results: dict, layout: str) -> None:
    err = results["wan-i2v"][layout]
    assert err["latents"] < TOL and err["pixels"] < TOL, err


@pytest.mark.parametrize("family", ["flux-fused", "wan-fused"])
def test_fused_models_match_single_process(results: dict, family: str) -> None:
    for name, err in results[family].items():
        assert err["latents"] < TOL and err["pixels"] < TOL, (family, name, err)


def test_layout_errors(results: dict) -> None:
    assert "FluxPipeline has no classifier-free guidance" in results["flux_cfg_error"]
    assert "--ulysses-degree 4 does not divide the model's 2 attention heads" in results["flux_u4_error"]
