"""HunyuanVideo under sequence parallelism (Ulysses, Ring, USP) gives the single-process result (fp32, gloo).

The batch holds two prompts of different lengths, so the text is trimmed to the longer one and the shorter
one keeps a key mask: the text segment and its mask are sharded with the video tokens (the PLAN's joint
sequence), and the shards' padding and the masked text keys are both removed before any kernel runs.
9 video tokens and 13 text tokens: divisible by neither 2 nor 4. One world of 4 processes serves the module.

True CFG (negative prompts, true_cfg_scale 3) under CFG parallelism, alone (CFG2, two replicas) and with
Ulysses (CFG2xU2), against one process running the same requests: the conditional branch on one cfg rank
group, the unconditional one (its own text length and mask) on the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffserve.config import GenerationRequest
from diffserve.engine.entry import Engine
from diffserve.engine.ranks import parallelize_pipeline, spawn_world
from diffserve.parallel.mesh import ParallelConfig, build_mesh_groups
from diffserve.pipelines.base import PipelineState

WORLD = 4
TOL = 1e-4  # fp32; the measured errors are printed
LAYOUTS = {"U2": (2, 1), "R2": (1, 2), "U2xR2": (2, 2)}
CFG_LAYOUTS = {"CFG2": (1, 1), "CFG2xU2": (2, 1)}  # with --enable-cfg-parallel and true CFG
PARAMS = {"height": 16, "width": 48, "num_frames": 9, "num_inference_steps": 2, "max_sequence_length": 16}
PROMPTS = (("a red fox trotting through a snowy pine forest at golden hour", 5), ("a cat", 6))
NEGATIVES = {"negative_prompt": "blurry", "true_cfg_scale": 3.0}


def _world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _outputs(engine: Engine, true_cfg: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    extra = NEGATIVES if true_cfg else {}
    requests = [GenerationRequest(prompt=p, seed=s, **PARAMS, **extra) for p, s in PROMPTS]  # type: ignore[arg-type]
    state = PipelineState(requests=requests, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        engine.pipeline(state)
    text_len, masked = state.cond["text"].shape[1], "text_mask" in state.cond
    return state.latents.float(), state.pixels, text_len, masked  # type: ignore[union-attr,return-value]


def _worker(rank: int, out_file: str, repo: str) -> None:
    results: dict[str, object] = {}
    load = dict(dtype="fp32", device="cpu")
    ref_latents, ref_pixels, text_len, masked = _outputs(Engine.from_pretrained(repo, **load))
    results["text"] = {"length": text_len, "masked": masked}
    for name, (u, r) in LAYOUTS.items():
        engine = Engine.from_pretrained(repo, **load)
        config = ParallelConfig(num_gpus=WORLD, ulysses_degree=u, ring_degree=r, dp_size=WORLD // (u * r))
        parallelize_pipeline(engine.pipeline, engine.attention, build_mesh_groups(config.resolve()))
        latents, pixels, _, _ = _outputs(engine)
        results[name] = {"latents": _world_max((latents - ref_latents).abs().max().item()),
                         "pixels": _world_max((pixels - ref_pixels).abs().max().item())}
    cfg_latents, cfg_pixels, _, _ = _outputs(Engine.from_pretrained(repo, **load), true_cfg=True)
    results["true CFG vs none"] = {"latents": _world_max((cfg_latents - ref_latents).abs().max().item())}
    for name, (u, r) in CFG_LAYOUTS.items():
        engine = Engine.from_pretrained(repo, **load)
        config = ParallelConfig(num_gpus=WORLD, ulysses_degree=u, ring_degree=r, cfg_parallel=True,
                                dp_size=WORLD // (2 * u * r))
        parallelize_pipeline(engine.pipeline, engine.attention, build_mesh_groups(config.resolve()))
        latents, pixels, _, _ = _outputs(engine, true_cfg=True)
        results[name] = {"latents": _world_max((latents - cfg_latents).abs().max().item()),
                         "pixels": _world_max((pixels - cfg_pixels).abs().max().item())}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from diffserve.testing.fixtures import fixture_path

    out = tmp_path_factory.mktemp("hunyuan-parallel") / "results.json"
    spawn_world(_worker, WORLD, str(out), str(fixture_path("hunyuan-video")))
    res = json.loads(out.read_text())
    for name, err in res.items():
        if name not in ("text", "true CFG vs none"):
            print(f"hunyuan-video {name}: max |latents - single| = {err['latents']:.2e}, "
                  f"max |pixels - single| = {err['pixels']:.2e}")
    return res


def test_batch_exercises_masked_text(results: dict) -> None:
    assert results["text"] == {"length": 13, "masked": True}


def test_true_cfg_changes_the_result(results: dict) -> None:
    assert results["true CFG vs none"]["latents"] > 1e-2


@pytest.mark.parametrize("layout", [*LAYOUTS, *CFG_LAYOUTS])
def test_layouts_match_single_process(results: dict, layout: str) -> None:
    err = results[layout]
    assert err["latents"] < TOL and err["pixels"] < TOL, err
