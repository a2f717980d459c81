"""The 8-GPU layouts of issue #18 give the single-process result (fp32, gloo on CPU, 8 ranks).

One world of 8 processes is spawned once for the module and runs every layout of every model in turn,
each with its own process groups:

* USP attention at the seam (random q/k/v vs SDPA): U8, U4xR2, U2xR4, R8;
* tiny Wan2.1 T2V (CFG 5): U8, U4xR2, U2xR2xCFG2, CFG2xU4;
* tiny FLUX.1-dev (no CFG branch): U8, U4xR2, R8;
* tiny HunyuanVideo (a batch of two prompts: trimmed, masked text): U8, U4xR2.

Ulysses 8 needs a head count divisible by 8 and the tiny fixtures have 2 heads, so every model runs as
an 8-head variant of its tiny repo: the same repo with the transformer rebuilt by the fixtures' own
`save_component` from its tiny config with `num_attention_heads = 8` (head size unchanged).

Sequence lengths are chosen so that 8 shards need padding and some shards hold no real token at all:
Wan 18 video tokens (3 per shard, ranks 6 and 7 empty), FLUX 7 text + 15 image tokens (rank 7 has no
text), HunyuanVideo 9 video + 13 text tokens. Each model's single-process reference is computed once (on
one rank, the models' references on different ranks at the same time) and sent to every rank; every rank
compares its own output with it, and the largest error over the ranks is reported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffserve.config import GenerationRequest
from diffserve.engine.entry import Engine
from diffserve.engine.ranks import parallelize_pipeline, spawn_world
from diffserve.layers.attention import sdpa_attention
from diffserve.layers.parallel import USPAttention
from diffserve.parallel.mesh import ParallelConfig, build_mesh_groups
from diffserve.parallel.sequence import segments_layout, take_shard
from diffserve.pipelines.base import PipelineState

WORLD = 8
HEADS = 8
TOL = 1e-4  # fp32, as tests/test_parallel_exactness.py; the measured errors are printed
ATTENTION_TOL = 1e-5

Layout = tuple[int, int, bool]  # (ulysses, ring, cfg parallel)
ATTENTION_LAYOUTS: dict[str, Layout] = {"U8": (8, 1, False), "U4xR2": (4, 2, False), "U2xR4": (2, 4, False),
                                        "R8": (1, 8, False)}
WAN_LAYOUTS: dict[str, Layout] = {"U8": (8, 1, False), "U4xR2": (4, 2, False), "U2xR2xCFG2": (2, 2, True),
                                  "CFG2xU4": (4, 1, True)}
FLUX_LAYOUTS: dict[str, Layout] = {"U8": (8, 1, False), "U4xR2": (4, 2, False), "R8": (1, 8, False)}
HUNYUAN_LAYOUTS: dict[str, Layout] = {"U8": (8, 1, False), "U4xR2": (4, 2, False)}

STEPS = 2
# 3 latent frames x 3 x 2 patches = 18 video tokens
WAN_REQUESTS = [{"prompt": "a red fox", "negative_prompt": "blurry", "height": 48, "width": 32, "num_frames": 9,
                 "num_inference_steps": STEPS, "seed": 5, "max_sequence_length": 8}]
# 7 text + 5 x 3 = 15 image tokens
FLUX_REQUESTS = [{"prompt": "a red fox", "height": 20, "width": 12, "num_inference_steps": STEPS, "seed": 5,
                  "max_sequence_length": 7}]
# 9 video tokens; the two prompts' text is trimmed to the longer one (13 tokens), the shorter one is masked
_HUNYUAN = {"height": 16, "width": 48, "num_frames": 9, "num_inference_steps": STEPS, "max_sequence_length": 16}
HUNYUAN_REQUESTS = [{"prompt": "a red fox trotting through a snowy pine forest at golden hour", "seed": 5, **_HUNYUAN},
                    {"prompt": "a cat", "seed": 6, **_HUNYUAN}]

# model -> (fixture, requests, layouts); the order is the order of the runs inside the world
MODELS: dict[str, tuple[str, list[dict], dict[str, Layout]]] = {
    "wan": ("wan-t2v", WAN_REQUESTS, WAN_LAYOUTS),
    "flux": ("flux-dev", FLUX_REQUESTS, FLUX_LAYOUTS),
    "hunyuan": ("hunyuan-video", HUNYUAN_REQUESTS, HUNYUAN_LAYOUTS),
}


def _config(u: int, r: int, cfg: bool) -> ParallelConfig:
    return ParallelConfig(num_gpus=WORLD, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg)


def _world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def eight_head_repo(fixture: str, out: Path) -> Path:
    """A copy of the tiny repo `fixture` whose transformer has 8 attention heads (head size unchanged),
    built from its tiny config with the fixtures' own `save_component`."""
    from diffserve.testing.fixtures import component_plan, fixture_path, save_component

    src = fixture_path(fixture)
    shutil.copytree(src, out, ignore=lambda folder, names: ["transformer"] if Path(folder) == src else [])
    component = next(c for c in component_plan(fixture) if c.name == "transformer")
    component.config["num_attention_heads"] = HEADS
    save_component(component, out / "transformer")
    return out


def _attention_errors(u: int, r: int) -> float:
    """Largest error of USP attention on random q/k/v against full SDPA over several segmentations."""
    groups = build_mesh_groups(_config(u, r, False).resolve())
    usp = USPAttention(groups.ulysses, groups.ring)
    sp, me = groups.sp.size, groups.sp.rank
    worst = 0.0
    for segments in ([5], [8], [13], [7, 15], [3, 17]):
        for heads in (8, 16):
            g = torch.Generator().manual_seed(sum(segments) * 10 + heads)
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
            valid = torch.ones(layout.local_len, dtype=torch.bool) if layout.valid is None else layout.valid[me]
            if valid.any():
                worst = max(worst, (out - shard(ref))[:, valid].abs().max().item())
    return _world_max(worst)


def _outputs(engine: Engine, requests: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    state = PipelineState(requests=[GenerationRequest(**r) for r in requests], device=torch.device("cpu"),
                          dtype=torch.float32)
    with torch.inference_mode():
        engine.pipeline(state)
    return state.latents.float(), state.pixels  # type: ignore[union-attr,return-value]


def _load(repo: str) -> Engine:
    return Engine.from_pretrained(repo, dtype="fp32", device="cpu")


def _model_errors(rank: int, repos: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """Every model's layouts against its single-process reference (one reference run per model)."""
    refs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (model, (_, requests, _)) in enumerate(MODELS.items()):  # reference of model i on rank i
        if rank == i % WORLD:
            refs[model] = _outputs(_load(repos[model]), requests)
    for i, model in enumerate(MODELS):
        box = [refs.get(model)]
        dist.broadcast_object_list(box, src=i % WORLD)
        refs[model] = box[0]  # type: ignore[assignment]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, (_, requests, layouts) in MODELS.items():
        ref_latents, ref_pixels = refs[model]
        out[model] = {}
        for name, (u, r, cfg) in layouts.items():
            engine = _load(repos[model])
            groups = build_mesh_groups(_config(u, r, cfg).resolve(HEADS))
            parallelize_pipeline(engine.pipeline, engine.attention, groups)
            latents, pixels = _outputs(engine, requests)
            out[model][name] = {"latents": _world_max((latents - ref_latents).abs().max().item()),
                                "pixels": _world_max((pixels - ref_pixels).abs().max().item())}
    return out


def _worker(rank: int, out_file: str, repos: dict[str, str]) -> None:
    results: dict[str, object] = {
        "attention": {name: _attention_errors(u, r) for name, (u, r, _) in ATTENTION_LAYOUTS.items()}}
    results.update(_model_errors(rank, repos))
    if rank == 0:
        Path(out_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eight-ranks")
    repos = {model: str(eight_head_repo(fixture, root / fixture)) for model, (fixture, _, _) in MODELS.items()}
    out = root / "results.json"
    spawn_world(_worker, WORLD, str(out), repos)
    res = json.loads(out.read_text())
    for name, err in res["attention"].items():
        print(f"attention {name}: max |USP - SDPA| = {err:.2e}")
    for model in MODELS:
        for name, err in res[model].items():
            print(f"{model} {name}: max |latents - single| = {err['latents']:.2e}, "
                  f"max |pixels - single| = {err['pixels']:.2e}")
    return res


def test_variant_repo_differs_from_the_tiny_one_in_heads_only(tmp_path: Path) -> None:
    from diffserve.testing.fixtures import fixture_path

    def config(repo: Path) -> dict:
        return json.loads((repo / "transformer" / "config.json").read_text())

    variant, tiny = config(eight_head_repo("flux-dev", tmp_path / "flux")), config(fixture_path("flux-dev"))
    assert variant.pop("num_attention_heads") == HEADS and tiny.pop("num_attention_heads") != HEADS
    assert variant == tiny


@pytest.mark.parametrize("layout", list(ATTENTION_LAYOUTS))
def test_attention_matches_sdpa(results: dict, layout: str) -> None:
    assert results["attention"][layout] < ATTENTION_TOL


@pytest.mark.parametrize(("model", "layout"), [(m, name) for m, (_, _, ls) in MODELS.items() for name in ls])
def test_layouts_match_single_process(results: dict, model: str, layout: str) -> None:
    err = results[model][layout]
    assert err["latents"] < TOL and err["pixels"] < TOL, err
