"""Running big models on small cards: CPU offload (`diffserve.engine.offload`), the `--max-gpu-memory` planner
(`diffserve.engine.memory_plan`) and tiled VAE decoding (`diffserve.pipelines.stages.vae_tiling`).

On the CPU the offload code runs for real with host-to-host copies, so an offloaded pipeline must give
exactly the all-on-device output (fp32, tiny FLUX and Wan repos)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from diffserve import Engine
from diffserve.cli_args import memory_options
from diffserve.config import EngineConfig, GenerationRequest, OffloadConfig, PlanSize
from diffserve.engine.memory_plan import (
    GIB,
    Footprint,
    beyond_plan,
    choose_plan,
    plan_cost,
    plan_tokens,
    resolve_offload,
)
from diffserve.engine.offload import (
    BlockStream,
    ModuleOffload,
    OffloadedStage,
    StreamedBlock,
    stream_blocks,
    streamed_indices,
)
from diffserve.errors import UserError
from diffserve.models.loader import read_model_index
from diffserve.pipelines.base import PipelineState
from diffserve.testing.fixtures import fixture_path

FLUX = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, seed=3, progress=False)
WAN = dict(height=16, width=16, num_frames=5, num_inference_steps=2, negative_prompt="blurry",
           max_sequence_length=16, seed=5, progress=False)
ALL = dict(text_encoder_cpu_offload=True, vae_cpu_offload=True, dit_cpu_offload=True)


def _image(engine: Engine, **kw: object) -> np.ndarray:
    return np.asarray(engine.generate("a red circle", **{**FLUX, **kw}).images[0])


def _video(engine: Engine) -> np.ndarray:
    return engine.generate("a cat surfing", **WAN).videos[0]


@pytest.fixture(scope="module")
def flux_repo():
    return fixture_path("flux-dev")


@pytest.fixture(scope="module")
def flux_base(flux_repo) -> Engine:
    return Engine.from_pretrained(str(flux_repo), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def flux_ref(flux_base: Engine) -> np.ndarray:
    return _image(flux_base)


@pytest.fixture(scope="module")
def flux_all(flux_repo) -> Engine:
    return Engine.from_pretrained(str(flux_repo), device="cpu", dtype="fp32", **ALL)


@pytest.fixture(scope="module")
def wan_ref() -> np.ndarray:
    return _video(Engine.from_pretrained(str(fixture_path("wan-t2v")), device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def wan_all() -> Engine:
    return Engine.from_pretrained(str(fixture_path("wan-t2v")), device="cpu", dtype="fp32", vae_tiling=False, **ALL)


# ----------------------------------------------------------------------------------------------------------
# Offload gives the all-on-device output


def test_flux_offloaded_equals_on_device(flux_all: Engine, flux_ref: np.ndarray) -> None:
    engine = flux_all
    assert sorted(engine.offloaded.modules) == ["text_encoder", "text_encoder_2", "vae"]
    assert [len(s.indices) for s in engine.offloaded.streams] == [2, 2]  # double and single blocks
    t = engine.pipeline.components.transformer
    assert all(isinstance(b, StreamedBlock) for b in (*t.transformer_blocks, *t.single_transformer_blocks))
    # parameter names unchanged; FLUX's modulation norms (called outside the blocks) stay resident
    names = {n for n, _ in t.named_parameters()}
    assert "transformer_blocks.0.attn.to_q.weight" in names or "transformer_blocks.0.attn.qkv.weight" in names
    assert all("norm1" not in n for s in engine.offloaded.streams for n, _ in s.params[s.indices[0]])
    assert np.array_equal(_image(engine), flux_ref)


def test_streaming_through_one_slot_recopies_every_block(flux_base: Engine, flux_ref: np.ndarray) -> None:
    """One slot for two blocks: every call copies its block in, and the output is still exact. (This streams
    the module-scoped base engine's blocks; the tests after it read only its weights' shapes.)"""
    t = flux_base.pipeline.components.transformer
    streams = stream_blocks(t, torch.device("cpu"), 1.0, slots=1)
    assert [len(s.slots) for s in streams] == [1, 1]
    assert np.array_equal(_image(flux_base), flux_ref)
    # 2 model calls (steps), 2 blocks per list, each call recopies; FLUX's modulation pass copies once more
    assert all(s.copies >= 4 for s in streams)


def test_wan_offloaded_equals_on_device(wan_all: Engine, wan_ref: np.ndarray) -> None:
    assert sorted(wan_all.offloaded.modules) == ["text_encoder", "vae"]
    assert np.array_equal(_video(wan_all), wan_ref)


def test_offload_on_every_rank_of_a_parallel_world(flux_repo, flux_ref: np.ndarray) -> None:
    """Two gloo ranks (Ulysses 2), each streaming its DiT blocks and offloading its text encoders and VAE: the
    image is the one-process, all-on-device image."""
    from diffserve.parallel.mesh import ParallelConfig

    with Engine.from_pretrained(str(flux_repo), device="cpu", dtype="fp32",
                                parallel=ParallelConfig(num_gpus=2, ulysses_degree=2), **ALL) as engine:
        got = _image(engine)
    diff = np.abs(got.astype(int) - flux_ref.astype(int)).max()
    assert got.shape == flux_ref.shape and diff <= 1, diff


def test_merged_lora_then_offload(flux_repo, flux_base: Engine, flux_ref: np.ndarray, tmp_path) -> None:
    """A merged LoRA goes into the weights before the blocks are streamed: same output as without offload."""
    from safetensors.torch import save_file

    w = flux_base.pipeline.components.transformer.transformer_blocks[0].ff.net[2].weight
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "ink.safetensors"
    save_file({"transformer.transformer_blocks.0.ff.net.2.lora_A.weight": torch.randn(4, w.shape[1], generator=g),
               "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": torch.randn(w.shape[0], 4, generator=g)},
              str(path))
    merged = Engine.from_pretrained(str(flux_repo), device="cpu", dtype="fp32", loras=[(str(path), 0.5)])
    offloaded = Engine.from_pretrained(str(flux_repo), device="cpu", dtype="fp32", loras=[(str(path), 0.5)], **ALL)
    ref = _image(merged)
    assert not np.array_equal(ref, flux_ref)  # the LoRA changes the image
    assert np.array_equal(_image(offloaded), ref)


# ----------------------------------------------------------------------------------------------------------
# The mechanisms on their own


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.randn(dim))
        self.register_buffer("shift", torch.randn(dim))  # streamed too (FP8 layers keep weights in buffers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x) + self.shift) * self.scale


class Stack(nn.Module):
    REPEATED_BLOCKS = ("blocks",)

    def __init__(self, n: int = 5, dim: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n))

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        x = self.inp(x)
        for k in range(len(self.blocks) if upto is None else upto):
            x = self.blocks[k](x)
        return x


def test_block_stream_prefetches_in_cycle_and_keeps_identity() -> None:
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(3, 8)
    with torch.no_grad():
        ref, ref_part = model(x), model(x, upto=2)
    params = [p for b in model.blocks for p in b.parameters()]
    (stream,) = stream_blocks(model, torch.device("cpu"), 1.0, slots=2)
    assert [id(p) for b in model.blocks for p in b.parameters()] == [id(p) for p in params]  # same objects
    # block i's parameters are views of slot i mod 2, for good
    assert model.blocks[0].lin.weight.data_ptr() == model.blocks[2].lin.weight.data_ptr() \
        != model.blocks[1].lin.weight.data_ptr()
    assert model.blocks[0].shift.data_ptr() == model.blocks[2].shift.data_ptr()
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in Stack().named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        assert torch.equal(model(x, upto=2), ref_part)  # a partial run (a step cache skipping blocks)
        assert torch.equal(model(x), ref)
    # first call: blocks 0..4 each copied once (0 on demand, the others prefetched), plus block 0 prefetched
    # for the next call at block 4 (the cycle wraps round)
    assert stream.copies >= 6 and stream.owner[stream.slot_of[0]] in (0, 1, 2, 3, 4)


def test_partial_streaming_spreads_the_streamed_blocks() -> None:
    assert streamed_indices(10, 1.0) == list(range(10))
    assert streamed_indices(10, 0.0) == []
    assert streamed_indices(10, 0.2) == [2, 7]
    assert streamed_indices(4, 0.01) == [2]  # rounded up to one block
    torch.manual_seed(1)
    model, x = Stack(n=6).eval(), torch.randn(2, 8)
    with torch.no_grad():
        ref = model(x)
    (stream,) = stream_blocks(model, torch.device("cpu"), 0.5)
    assert stream.indices == [1, 3, 5]
    assert [isinstance(b, StreamedBlock) for b in model.blocks] == [False, True, False, True, False, True]
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_streamed_blocks_compile_once_like_unstreamed() -> None:
    """Compiled blocks whose weights are copied into persistent slots: no recompilation beyond what the
    same compiled blocks need without streaming, and the same numbers."""
    torch.manual_seed(2)
    x = torch.randn(2, 8)

    def run(stream: bool) -> tuple[torch.Tensor, int]:
        torch._dynamo.reset()
        graphs: list[int] = []

        def backend(gm: torch.fx.GraphModule, _inputs: list) -> object:
            graphs.append(1)
            return gm.forward

        torch.manual_seed(3)
        model = Stack().eval()
        for block in model.blocks:
            block.compile(backend=backend, dynamic=False)
        if stream:
            stream_blocks(model, torch.device("cpu"), 1.0)
        with torch.no_grad():
            out = [model(x) for _ in range(3)][-1]
        return out, len(graphs)

    plain, compiled_plain = run(False)
    streamed, compiled_streamed = run(True)
    assert torch.equal(streamed, plain) and compiled_streamed == compiled_plain


def test_block_stream_refuses_mixed_layouts() -> None:
    blocks = nn.ModuleList([Block(8), Block(4)])
    with pytest.raises(ValueError, match="block 1 differs"):
        BlockStream(blocks, [0, 1], torch.device("cpu"))


def test_stage_offload_moves_modules_back(flux_all: Engine) -> None:
    """Each offloaded component is resident exactly during the stages that use it, and its tensors point at
    their host copies again afterwards (also when the stage raises)."""
    engine = flux_all
    offs = engine.offloaded.modules
    seen: dict[str, set[str]] = {}
    for stage in engine.pipeline.stages:
        inner = stage.inner if isinstance(stage, OffloadedStage) else stage

        def spy(state: PipelineState, run=inner.run, name=inner.name) -> None:
            seen[name] = {n for n, m in offs.items() if m.resident}
            run(state)

        inner.run = spy  # test-only instrumentation of this engine's stage objects
    _image(engine)
    assert seen["text_encoding"] == {"text_encoder", "text_encoder_2"}
    assert seen["decoding"] == {"vae"} and seen["denoising"] == set()
    for m in offs.values():
        assert not m.resident
        assert all(t.data_ptr() == h.data_ptr() for t, h in zip(m.tensors, m.homes, strict=True))
    vae = offs["vae"]
    stage = OffloadedStage(type("Boom", (), {"name": "decoding", "run": lambda self, s: 1 / 0})(), [vae])
    with pytest.raises(ZeroDivisionError):
        stage.run(None)  # type: ignore[arg-type]
    assert not vae.resident


def test_module_offload_keeps_tied_weights_tied() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Linear(4, 4))
    model[1].weight = lin.weight
    off = ModuleOffload("m", model, torch.device("cpu"))
    assert len(off.tensors) == 3  # weight (tied), two biases
    off.load()
    assert model[1].weight is model[0].weight
    off.unload()


# ----------------------------------------------------------------------------------------------------------
# --max-gpu-memory


def _fp(**kw: int) -> Footprint:
    base = dict(text_encoders=10 * GIB, vae=GIB // 4, dit_other=GIB // 2, dit_blocks=22 * GIB, dit_block_max=GIB // 2,
                denoise_activations=GIB, decode_activations=2 * GIB, model_calls=28)
    return Footprint(**{**base, **kw})


def test_plan_picks_the_cheapest_that_fits() -> None:
    fp = _fp()
    assert choose_plan(fp, 80 * GIB) == plan_cost(fp, False, False, 0.0)  # everything fits: nothing offloaded
    p40 = choose_plan(fp, 38 * GIB)  # 22.5 + 10 + 0.25 + 2 > 0.9 x 38 -> the text encoders go (cheapest)
    assert (p40.text_encoder, p40.vae, p40.dit) == (True, False, 0.0)
    p24 = choose_plan(fp, 24 * GIB)  # the DiT alone is 22.5 GiB: blocks must stream, as few as fit
    assert p24.text_encoder and p24.dit > 0 and p24.fits and p24.peak <= 0.9 * 24 * GIB
    assert plan_cost(fp, True, True, p24.dit - 0.05).peak > 0.9 * 24 * GIB  # one step fewer would not fit
    p8 = choose_plan(fp, 8 * GIB)  # text encoders (10 GiB) never fit: everything offloaded, flagged
    assert not p8.fits and (p8.text_encoder, p8.vae, p8.dit) == (True, True, 1.0)


def test_plan_peak_phases() -> None:
    fp = _fp(text_encoders=4 * GIB, dit_blocks=8 * GIB, dit_block_max=GIB, denoise_activations=3 * GIB)
    p = plan_cost(fp, text_encoder=True, vae=False, dit=1.0)
    # DiT resident: other 0.5 + 2 slots of 1 GiB = 2.5; phases: text 2.5 + 4 + VAE, denoise 2.5 + VAE + 3,
    # decode 2.5 + VAE + 2: the text phase is the largest
    assert p.peak == int(2.5 * GIB + 4 * GIB + fp.vae)
    assert p.moved == fp.text_encoders + 8 * GIB * 28
    assert choose_plan(fp, 80 * GIB, OffloadConfig(vae=True, dit=0.5)).dit >= 0.5  # given flags are a floor


def test_max_gpu_memory_from_a_real_repo(flux_repo) -> None:
    index = read_model_index(flux_repo)
    cfg = EngineConfig(model_path=str(flux_repo), dtype=torch.float32, device=torch.device("cpu"))
    fp = Footprint.from_checkpoint(index, cfg)
    assert fp.dit_blocks > 0 and fp.dit_other > 0 and fp.text_encoders > 0 and fp.model_calls == 28
    auto = dataclasses.replace(cfg, offload=OffloadConfig(max_gpu_memory="auto"))
    assert resolve_offload(auto, index) == auto  # auto on a CPU: nothing to save
    tight = dataclasses.replace(cfg, offload=OffloadConfig(max_gpu_memory=(fp.dit_other + fp.dit_blocks) / GIB))
    resolved = resolve_offload(tight, index)
    assert resolved.offload.text_encoder and resolved.offload.dit > 0
    # the budget holds the resident DiT but not the default request's untiled decode: tiling turns on
    assert fp.decode_untiled > fp.dit_other + fp.dit_blocks and resolved.vae_tiling is True
    roomy = dataclasses.replace(cfg, offload=OffloadConfig(max_gpu_memory=64))
    assert resolve_offload(roomy, index).vae_tiling is None  # auto stays auto


@pytest.mark.parametrize("name", ["flux-dev", "wan-t2v", "hunyuan-video", "qwen-image"])
def test_planner_uses_the_decode_stage_estimate(name: str) -> None:
    """The planner's untiled-decode figure is the one the model's decode stage computes for the default
    request, at the precision the VAE is loaded in (Wan: float32 unless --vae-dtype)."""
    from diffserve.pipelines.registry import defaults_from_configs, recipe_for

    repo = fixture_path(name)
    index = read_model_index(repo)
    recipe = recipe_for(index)
    d = defaults_from_configs(index)
    vae_conf = json.loads((repo / "vae" / "config.json").read_text())
    for vae_dtype, want in ((None, recipe.vae_dtype or torch.bfloat16), (torch.float16, torch.float16)):
        cfg = EngineConfig(model_path=str(repo), dtype=torch.bfloat16, device=torch.device("cpu"), vae_dtype=vae_dtype)
        fp = Footprint.from_checkpoint(index, cfg)
        assert fp.decode_untiled == recipe.decode_bytes(vae_conf, d.num_frames or 1, d.height, d.width, want) > 0
    assert (recipe.vae_dtype == torch.float32) == name.startswith("wan")


def test_the_plan_fits_the_size_asked_for() -> None:
    """A plan made for a larger request counts its activations and decode, streams more of the DiT in the same
    budget, and is recorded on the engine config (what later batches are checked against)."""
    repo = fixture_path("wan-t2v")
    index = read_model_index(repo)
    base = EngineConfig(model_path=str(repo), dtype=torch.float32, device=torch.device("cpu"))
    default = Footprint.from_checkpoint(index, base)  # 480x832x81
    big = Footprint.from_checkpoint(index, dataclasses.replace(base, offload=OffloadConfig(
        max_gpu_memory=1, plan_size=PlanSize(720, 1280, 81, batch=2))))
    text = 512  # the default request's text tokens
    ratio = (2 * (plan_tokens(720, 1280, 81) + text)) / (plan_tokens(480, 832, 81) + text)
    assert big.denoise_activations == pytest.approx(default.denoise_activations * ratio, rel=1e-9)
    assert big.decode_untiled > 2 * default.decode_untiled and big.dit_blocks == default.dit_blocks
    # a budget the default request fits with the whole DiT resident: the big plan must stream blocks
    budget = plan_cost(default, False, False, 0.0).peak / 0.89 / GIB
    small = resolve_offload(dataclasses.replace(base, offload=OffloadConfig(max_gpu_memory=budget)), index)
    large = resolve_offload(dataclasses.replace(base, offload=OffloadConfig(
        max_gpu_memory=budget, plan_size=PlanSize(720, 1280, 81, batch=2))), index)
    assert small.offload.dit == 0 and large.offload.dit > 0
    assert small.offload.plan_size == PlanSize(480, 832, 81) and large.offload.plan_size.batch == 2
    # frames left out take the model's; an image model's plan has none
    image = read_model_index(fixture_path("flux-dev"))
    cfg = EngineConfig(model_path="x", dtype=torch.float32, device=torch.device("cpu"),
                       offload=OffloadConfig(max_gpu_memory=64, plan_size=PlanSize.parse("720x1280")))
    assert resolve_offload(dataclasses.replace(cfg, model_path=str(repo)), index).offload.plan_size.num_frames == 81
    assert resolve_offload(dataclasses.replace(cfg, model_path="x"), image).offload.plan_size.num_frames is None


def test_batches_beyond_the_plan_are_named() -> None:
    from diffserve.pipelines.registry import defaults_from_configs

    d = defaults_from_configs(read_model_index(fixture_path("wan-t2v")))
    planned = PlanSize(480, 832, 81)
    assert beyond_plan(planned, d, [GenerationRequest(prompt="x")]) is None
    assert beyond_plan(planned, d, [GenerationRequest(prompt="x", height=480, width=832, num_frames=41)]) is None
    msg = beyond_plan(planned, d, [GenerationRequest(prompt="x", height=720, width=1280)])
    assert msg is not None and "720x1280x81" in msg and "480x832x81" in msg and "--plan-size" in msg
    assert beyond_plan(planned, d, [GenerationRequest(prompt="x", num_outputs=2)]) is not None  # twice the tokens
    assert beyond_plan(dataclasses.replace(planned, batch=2), d, [GenerationRequest(prompt="x", num_outputs=2)]) is None


def test_generate_plans_for_its_largest_batch(flux_repo, monkeypatch, tmp_path) -> None:
    """`generate --max-gpu-memory` without --plan-size plans for the largest batch it will run."""
    from diffserve import cli
    from diffserve.engine import entry

    seen = {}

    class Stop(Exception):
        pass

    def fake(model_path, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(entry.Engine, "from_pretrained", staticmethod(fake))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "height": 64, "width": 96, "num_outputs": 3}\n'
                       '{"prompt": "b", "height": 128, "width": 128}\n')
    args = cli.build_parser().parse_args(["generate", "--model-path", str(flux_repo), "--prompt-file", str(prompts),
                                          "--max-gpu-memory", "8", "--output-dir", str(tmp_path)])
    with pytest.raises(Stop):
        cli.cmd_generate(args)
    assert seen["plan_size"] == PlanSize(64, 96, None, batch=3)  # 3 outputs x 24 tokens beat 1 x 64 tokens
    args = cli.build_parser().parse_args(["generate", "--model-path", str(flux_repo), "--prompt", "x",
                                          "--max-gpu-memory", "8", "--plan-size", "512x512", "--output-dir",
                                          str(tmp_path)])
    with pytest.raises(Stop):
        cli.cmd_generate(args)
    assert seen["plan_size"] == PlanSize(512, 512)


def test_generate_prints_the_memory_plan(flux_repo, tmp_path, capsys) -> None:
    from diffserve import cli

    assert cli.main(["generate", "--model-path", str(flux_repo), "--prompt", "x", "--height", "64", "--width", "64",
                     "--num-inference-steps", "1", "--device", "cpu", "--dtype", "fp32", "--max-gpu-memory", "64",
                     "--dit-cpu-offload", "--output-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "offload (--max-gpu-memory 64.0, planned for 64x64): 2 blocks streamed" in err, err


# ----------------------------------------------------------------------------------------------------------
# Flags and errors


def test_flags_reach_the_engine_and_errors_are_one_line(flux_repo) -> None:
    from diffserve.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--dit-cpu-offload", "--vae-tiling", "on",
                                      "--max-gpu-memory", "24"])
    assert memory_options(args) == {"vae_tiling": True, "text_encoder_cpu_offload": False, "vae_cpu_offload": False,
                                    "dit_cpu_offload": True, "max_gpu_memory": 24.0, "plan_size": None}
    args = build_parser().parse_args(["serve", "--max-gpu-memory", "24", "--plan-size", "720x1280x81"])
    assert memory_options(args)["plan_size"] == PlanSize(720, 1280, 81)
    for flags, message in ((["--plan-size", "720x1280"], "needs --max-gpu-memory"),
                           (["--max-gpu-memory", "24", "--plan-size", "720"], "HEIGHTxWIDTH"),
                           (["--max-gpu-memory", "24", "--plan-size", "0x64"], "height=0")):
        with pytest.raises(UserError, match=message):
            memory_options(build_parser().parse_args(["serve", *flags]))
    args = build_parser().parse_args(["generate", "--prompt", "x", "--max-gpu-memory", "lots"])
    with pytest.raises(UserError, match="max-gpu-memory 'lots'"):
        memory_options(args)
    with pytest.raises(UserError, match="--dit-cpu-offload does not combine with --lora-mode unmerged"):
        Engine.from_pretrained(str(flux_repo), device="cpu", dit_cpu_offload=True, lora_mode="unmerged")
    with pytest.raises(UserError, match="give GiB"):
        OffloadConfig(max_gpu_memory=-1)


def test_serve_flags_reach_the_worker_engine(flux_repo) -> None:
    from diffserve.cli import build_parser
    from diffserve.server.messages import Ready, WorkerConfig
    from diffserve.server.worker import load_engine

    args = build_parser().parse_args(["serve", "--vae-cpu-offload", "--dit-cpu-offload", "--vae-tiling", "off"])
    cfg = WorkerConfig(str(flux_repo), dtype="fp32", device="cpu", **memory_options(args))

    class Events(list):
        send = list.append

    events = Events()
    engine = load_engine(cfg, events)
    assert isinstance(events[-1], Ready), events
    assert engine.config.offload == OffloadConfig(vae=True, dit=1.0) and engine.config.vae_tiling is False
    assert sorted(engine.offloaded.modules) == ["vae"] and len(engine.offloaded.streams) == 2


def test_parallel_engine_passes_memory_options_to_the_ranks(flux_repo, monkeypatch) -> None:
    import diffserve.engine.parallel_engine as pe
    from diffserve.engine import ranks
    from diffserve.parallel.mesh import ParallelConfig

    specs = []

    class Captured(Exception):
        pass

    def fake_world(spec):
        specs.append(spec)
        raise Captured

    monkeypatch.setattr(pe, "_SpawnedWorld", fake_world)
    with pytest.raises(Captured):
        Engine.from_pretrained(str(flux_repo), device="cpu", parallel=ParallelConfig(num_gpus=2, ulysses_degree=2),
                               vae_tiling=False, vae_cpu_offload=True, dit_cpu_offload=True)
    (spec,) = specs
    assert spec.vae_tiling is False and spec.offload == OffloadConfig(vae=True, dit=1.0)
    configs = []

    def fake_engine(config):
        configs.append(config)
        raise Captured

    monkeypatch.setattr(ranks, "LocalEngine", fake_engine)
    with pytest.raises(Captured):
        ranks.RankRuntime.build(spec, torch.device("cpu"))
    assert configs[0].offload == spec.offload and configs[0].vae_tiling is False
    with pytest.raises(UserError, match="--dit-cpu-offload does not combine"):  # before any process starts
        Engine.from_pretrained(str(flux_repo), device="cpu", parallel=ParallelConfig(num_gpus=2, ulysses_degree=2),
                               dit_cpu_offload=True, lora_mode="unmerged")


# ----------------------------------------------------------------------------------------------------------
# Tiled VAE decoding


def _set_small_tiles(vae: nn.Module) -> None:
    """Tiles smaller than the test image (64 px FLUX, 32 px Wan), so tiling happens."""
    if hasattr(vae, "tile_sample_min_size"):  # AutoencoderKL
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size, vae.tile_latent_min_size = 48, 48 // factor
    else:  # Wan / Qwen-Image VAEs
        vae.tile_sample_min_height = vae.tile_sample_min_width = 48
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = 32


@pytest.mark.parametrize("name", ["flux-dev", "wan-t2v"])
def test_tiled_decode_is_close_to_untiled(name: str, request: pytest.FixtureRequest) -> None:
    if name == "flux-dev":
        tiled = Engine.from_pretrained(str(fixture_path(name)), device="cpu", dtype="fp32", vae_tiling=True)
        assert tiled.config.vae_tiling is True
    else:  # the offloaded Wan engine (vae_tiling=False) switched to tiled: tiling composes with VAE offload
        tiled = request.getfixturevalue("wan_all")
        assert tiled.pipeline.components.vae_tiling is False
        tiled.pipeline.components.vae_tiling = True
    assert tiled.pipeline.components.vae_tiling is True
    vae = tiled.pipeline.components.vae
    _set_small_tiles(vae)
    decodes: list[bool] = []
    decode = vae.decode
    vae.decode = lambda *a, **k: (decodes.append(vae.use_tiling), decode(*a, **k))[1]  # test-only spy
    if name == "flux-dev":
        kw = dict(height=64, width=64)
        got = _image(tiled, **kw)
        tiled.pipeline.components.vae_tiling = False
        ref = _image(tiled, **kw)
    else:
        kw = {**WAN, "height": 64, "width": 64}
        got = tiled.generate("a cat surfing", **kw).videos[0]
        tiled.pipeline.components.vae_tiling = False
        ref = tiled.generate("a cat surfing", **kw).videos[0]
    assert decodes == [True, False]  # the flag reached the VAE
    diff = np.abs(got.astype(int) - ref.astype(int))
    r = float(np.corrcoef(got.ravel().astype(float), ref.ravel().astype(float))[0, 1])
    print(f"{name}: tiled vs untiled decode, max |uint8 diff| = {diff.max()}, mean {diff.mean():.2f}, r = {r:.4f}")
    assert diff.max() > 0  # tiles were blended (not the untiled path)
    # Close, not bit-exact. Stated tolerance, measured on these tiny random-weight VAEs (a hard case: nothing
    # trained them to be local): FLUX mean 3.3/255, r 0.997; Wan r 0.78 (its mid-block attends over the whole
    # frame, so each tile sees another context; a trained VAE's seams are far smaller).
    if name == "flux-dev":
        assert diff.mean() < 6 and r > 0.99
    else:
        assert r > 0.6
