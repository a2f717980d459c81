"""Qwen-Image and Qwen-Image-Edit under sequence and CFG parallelism give the single-process result (fp32,
gloo on CPU), through the generic transform that reads the transformer's PLAN.

Text-to-image: a batch of two prompts of different lengths with negative prompts of different lengths, so
both CFG branches carry a text key mask; 15 image tokens and the text lengths are divisible by neither 2 nor
4. Editing: the transformer alone on an edit-shaped batch (masked text, 15 noise + 16 reference tokens) for
every sequence layout, and the whole edit pipeline (a megapixel reference image) in one CFG x Ring layout.
One world of 4 processes serves the module; 2-process layouts run as two replicas at once.
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
from diffserve.layers.parallel import USPAttention, sdpa_attention_lse
from diffserve.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer
from diffserve.models.loader import load_dit
from diffserve.parallel.mesh import ParallelConfig, build_mesh_groups
from diffserve.parallel.sequence import sequence_parallel
from diffserve.pipelines.base import PipelineState

WORLD = 4
TOL = 1e-4  # fp32; the measured errors are printed
T2I_LAYOUTS = {"U2": (2, 1, False), "R2": (1, 2, False), "U2xR2": (2, 2, False), "CFG2": (1, 1, True),
               "CFG2xU2": (2, 1, True)}
MODEL_LAYOUTS = {"U2": (2, 1), "R2": (1, 2), "U2xR2": (2, 2), "U4": (4, 1)}
EDIT_LAYOUTS = {"CFG2xR2": (1, 2, True)}
T2I_PARAMS = {"height": 48, "width": 80, "num_inference_steps": 2, "guidance_scale": 4.0}  # 3 x 5 tokens
T2I_PROMPTS = (("a red fox trotting through a snowy pine forest at golden hour", "blurry", 5),
               ("a cat", "low quality, ugly, deformed, blurry", 6))
EDIT_SHAPES = [(1, 3, 5), (1, 4, 4)]


def _world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _layout(u: int, r: int, cfg: bool = False) -> ParallelConfig:
    rep = u * r * (2 if cfg else 1)
    return ParallelConfig(num_gpus=WORLD, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg, dp_size=WORLD // rep)


def _run(engine: Engine, requests: list[GenerationRequest]) -> tuple[torch.Tensor, PipelineState]:
    state = PipelineState(requests=requests, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        engine.pipeline(state)
    return state.pixels, state  # type: ignore[return-value]


def _pipeline_errors(repo: str, requests: list[GenerationRequest], layouts: dict) -> dict[str, object]:
    """Each layout's largest pixel difference from the single-process run (made on rank 0 and broadcast)."""
    load = dict(dtype="fp32", device="cpu")
    r = requests[0]
    single = torch.empty(sum(q.num_outputs for q in requests), 3, r.height, r.width)  # type: ignore[arg-type]
    flags = torch.zeros(2, dtype=torch.bool)
    if dist.get_rank() == 0:
        single, state = _run(Engine.from_pretrained(repo, **load), requests)
        flags = torch.tensor(["text_mask" in state.cond, "text_mask" in (state.uncond or {})])
    dist.broadcast(single, 0)
    dist.broadcast(flags, 0)
    out: dict[str, object] = {"masked": flags.tolist()}
    for name, (u, r, cfg) in layouts.items():
        engine = Engine.from_pretrained(repo, **load)
        parallelize_pipeline(engine.pipeline, engine.attention, build_mesh_groups(_layout(u, r, cfg).resolve()))
        pixels, _ = _run(engine, requests)
        out[name] = _world_max((pixels - single).abs().max().item())
    return out


def _model_errors(repo: str) -> dict[str, float]:
    """The transformer alone, edit-shaped inputs: single process vs each sequence layout."""
    folder = Path(repo) / "transformer"
    cfg = QwenImageConfig.from_json(folder / "config.json")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, sum(f * h * w for f, h, w in EDIT_SHAPES), 64, generator=g)
    ctx = torch.randn(2, 9, 16, generator=g)
    mask = torch.arange(9)[None] < torch.tensor([[9], [4]])
    t = torch.tensor([0.8, 0.4])
    cpu = torch.device("cpu")
    with torch.no_grad():
        single = load_dit(lambda: QwenImageTransformer(cfg), folder, torch.float32, cpu)(x, ctx, mask, t, EDIT_SHAPES)
        out = {}
        for name, (u, r) in MODEL_LAYOUTS.items():
            groups = build_mesh_groups(_layout(u, r).resolve())
            model = load_dit(lambda: QwenImageTransformer(cfg), folder, torch.float32, cpu)
            sp = sequence_parallel(model, groups.sp, USPAttention(groups.ulysses, groups.ring, sdpa_attention_lse))
            out[name] = _world_max((sp(x, ctx, mask, t, EDIT_SHAPES) - single).abs().max().item())
    return out


def _worker(rank: int, out_file: str, t2i_repo: str, edit_repo: str) -> None:
    t2i = [GenerationRequest(prompt=p, negative_prompt=n, seed=s, **T2I_PARAMS)  # type: ignore[arg-type]
           for p, n, s in T2I_PROMPTS]
    image = Image.fromarray((np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8))
    edit = [GenerationRequest(prompt="make it blue", negative_prompt="blurry", image=image, height=32, width=48,
                              num_inference_steps=2, seed=7)]
    results = {"t2i": _pipeline_errors(t2i_repo, t2i, T2I_LAYOUTS), "model": _model_errors(edit_repo),
               "edit": _pipeline_errors(edit_repo, edit, EDIT_LAYOUTS)}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from diffserve.testing.fixtures import fixture_path

    out = tmp_path_factory.mktemp("qwen-parallel") / "results.json"
    spawn_world(_worker, WORLD, str(out), str(fixture_path("qwen-image")), str(fixture_path("qwen-image-edit")))
    res = json.loads(out.read_text())
    for part, errors in res.items():
        for name, err in errors.items():
            if name != "masked":
                print(f"qwen {part} {name}: max |output - single process| = {err:.2e}")
    return res


def test_t2i_batch_exercises_masked_text(results: dict) -> None:
    assert results["t2i"]["masked"] == [True, True]


@pytest.mark.parametrize("layout", list(T2I_LAYOUTS))
def test_t2i_layouts_match_single_process(results: dict, layout: str) -> None:
    assert results["t2i"][layout] < TOL


@pytest.mark.parametrize("layout", list(MODEL_LAYOUTS))
def test_edit_transformer_layouts_match_single_process(results: dict, layout: str) -> None:
    assert results["model"][layout] < TOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(EDIT_LAYOUTS))
def test_edit_pipeline_layouts_match_single_process(results: dict, layout: str) -> None:
    assert results["edit"][layout] < TOL
