"""The GPU benchmark harness (benchmarks/bench_e2e.py, benchmarks/roofline.py) on tiny models on the CPU:
FLOP counting against torch's flop counter and diffusers' transformer, the report's roofline fields, the
lossless check and the rows appended to BENCHMARKS.md. Times measured here mean nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_e2e, roofline

PROMPT = "a red circle"


def test_attention_flops_match_the_two_matmuls() -> None:
    q, k = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 56, 8)  # (B, H, L, D)
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-1, -2)).softmax(-1) @ torch.randn(2, 3, 56, 8)
    assert roofline.attention_flops((2, 40, 3, 8), (2, 56, 3, 8)) == counter.get_total_flops()


def _diffusers_transformer_flops(repo: Path, **kw) -> float:
    """Matmul FLOPs of diffusers' transformer in a one-step generation (CPU SDPA is not counted by torch's
    counter, so this is the matmul part alone)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(repo, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    total, forward = [0.0], pipe.transformer.forward

    def counted(*args, **kwargs):
        with FlopCounterMode(display=False) as c:
            out = forward(*args, **kwargs)
        total[0] += c.get_total_flops()
        return out

    pipe.transformer.forward = counted
    pipe(PROMPT, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
    return total[0]


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_step_flops_equal_diffusers_transformer(name: str, flux_dev_repo: Path, wan_t2v_repo: Path) -> None:
    from diffserve import Engine

    repo, kw = ((flux_dev_repo, dict(height=64, width=64, guidance_scale=3.5)) if name == "flux" else
                (wan_t2v_repo, dict(height=32, width=32, num_frames=5, guidance_scale=5.0)))
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    t = engine.pipeline.components.transformer
    flops = roofline.count_step_flops(t, engine.attention,
                                      lambda: engine.generate(PROMPT, num_inference_steps=1, seed=0, **kw))
    assert flops.matmul == _diffusers_transformer_flops(repo, **kw) > 0
    calls = sum(flops.attention_shapes.values())
    if name == "flux":  # one joint attention per block, one transformer call (no CFG)
        assert calls == len(t.transformer_blocks) + len(t.single_transformer_blocks)
    else:  # self- and cross-attention per block, for the conditional and the unconditional pass
        assert calls == 2 * 2 * len(t.blocks) or (calls == 2 * len(t.blocks) and flops.main_attention_shape()[0] == 2)
    b, lq, lk, h, d = flops.main_attention_shape()
    assert flops.attention >= roofline.attention_flops((b, lq, h, d), (b, lk, h, d)) > 0
    # the plain methods are back after counting
    assert "forward" not in vars(t) and "local" not in vars(engine.attention)


def test_append_rows_goes_to_the_end_of_the_table(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    roofline.append_rows(path, ["| a |\n"])
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n" + roofline.BENCH_HEADING) and text.endswith("| a |\n")
    path.write_text(path.read_text() + "\n## Later section\n\ntext\n")
    roofline.append_rows(path, ["| b |\n"])
    text = path.read_text()
    assert "| a |\n| b |\n\n## Later section" in text and text.count(roofline.BENCH_HEADING) == 1


def test_harness_reports_roofline_and_appends_rows(flux_dev_repo: Path, tmp_path: Path) -> None:
    bench, out = tmp_path / "BENCHMARKS.md", tmp_path / "report.json"
    report = bench_e2e.main(["tiny-flux", "--repo", str(flux_dev_repo), "--device", "cpu", "--dtype", "fp32",
                             "--steps", "2", "--out", str(out), "--benchmarks", str(bench)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["engine"] for r in report["runs"]] == ["diffserve", "diffusers"]
    # same weights, same seed; FLUX computes all steps' modulations in one GEMM (rounding differs in the last bit)
    assert report["output_mean_abs_diff_255_vs_diffusers"]["diffserve"] < 0.01
    flops = report["step_flops"]
    assert flops["matmul"] > 0 and flops["attention"] > 0
    assert report["ceilings_tflops"]["matmul"] > 0 and report["ceilings_tflops"]["attention"]["sdpa"] > 0
    for name, roof in report["roofline"].items():
        run = next(r for r in report["runs"] if r["engine"] == name)
        assert roof["tflops"] == pytest.approx((flops["matmul"] + flops["attention"]) / run["per_step_s"] / 1e12,
                                               rel=1e-3)
        assert roof["floor_fraction"] == pytest.approx(roof["floor_s"] / run["per_step_s"], rel=1e-2)
    rows = [line for line in bench.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2 and all("tiny-flux" in r and "bench_e2e.py tiny-flux" in r for r in rows)
    assert report["speedup_vs_diffusers"]["diffusers"] == {"per_step": 1.0, "e2e": 1.0}


def test_full_size_flux_step_flops_match_the_architecture() -> None:
    """benchmarks/step_flops.py on the meta device: FLUX.1-dev 1024^2, counted layer by layer by hand."""
    from benchmarks import step_flops

    flops = step_flops.count_workload(bench_e2e.WORKLOADS["flux-dev-1024"])
    d, ff, img, txt = 3072, 4 * 3072, 4096, 512

    def mm(tokens: int, k: int, n: int) -> int:
        return 2 * tokens * k * n

    stream = lambda t: 4 * mm(t, d, d) + mm(t, d, ff) + mm(t, ff, d)  # q, k, v, out; MLP
    double = stream(img) + stream(txt) + 2 * mm(1, d, 6 * d)
    single = 3 * mm(img + txt, d, d) + mm(img + txt, d, ff) + mm(img + txt, d + ff, d) + mm(1, d, 3 * d)
    embeds = mm(img, 64, d) + mm(txt, 4096, d) + mm(1, 256, d) + mm(1, d, d) * 3 + mm(1, 256, d) + mm(1, 768, d)
    head = mm(1, d, 2 * d) + mm(img, d, 64)
    assert flops.matmul == 19 * double + 38 * single + embeds + head
    assert flops.attention == 57 * roofline.attention_flops((1, img + txt, 24, 128), (1, img + txt, 24, 128))


def test_scaling_harness_merges_invocations_and_charts(wan_t2v_repo: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/bench_scaling.py on the CPU: a real one-GPU run, a layout that fails (error row, the run
    goes on), a later invocation compared against the saved one-GPU output, the chart and the markdown."""
    import numpy as np
    from PIL import Image

    from benchmarks import bench_scaling

    out = tmp_path / "scaling.json"
    common = ["tiny-wan", "--repo", str(wan_t2v_repo), "--device", "cpu", "--dtype", "fp32", "--steps", "1",
              "--out", str(out)]
    rows = bench_scaling.main([*common, "--layouts", "1;u4"])["tiny-wan"]  # 2 heads: U4 fails before any spawn
    assert [r["layout"] for r in rows] == ["1", "u4"]
    assert rows[0]["mean_abs_diff_255_vs_1gpu"] == 0.0 and rows[0]["speedup_per_step"] == 1.0
    assert "does not divide" in rows[1]["error"] and "per_step_s" not in rows[1]
    ref = np.load(tmp_path / "ref" / "tiny-wan-1gpu.npy")
    assert ref.dtype == np.uint8 and ref.shape[0] == bench_scaling.SCALING_WORKLOADS["tiny-wan"].num_frames

    def fake_run(repo: Path, layout: str, w: object, steps: int, device: str, dtype: str):
        # a second invocation (no "1" layout) on 4 "GPUs", twice as fast per step; its output is off by 1/255
        base = rows[0]
        row = {"layout": layout, "gpus": 4, "device": "CPU", "per_step_s": base["per_step_s"] / 2,
               "fixed_s": base["fixed_s"], "e2e_full_s": base["e2e_full_s"] / 2}
        return row, np.where(ref < 255, ref + 1, ref - 1).astype(np.uint8)

    monkeypatch.setattr(bench_scaling, "run_layout", fake_run)
    rows = bench_scaling.main([*common, "--layouts", "u4;cfg2xu2"])["tiny-wan"]
    assert [r["layout"] for r in rows] == ["1", "u4", "cfg2xu2"]  # u4's error row replaced in place
    assert json.loads(out.read_text())["tiny-wan"] == rows
    for r in rows[1:]:
        assert r["mean_abs_diff_255_vs_1gpu"] == 1.0
        assert r["speedup_per_step"] == pytest.approx(2.0, abs=1e-2) and r["efficiency_per_step"] == pytest.approx(0.5, abs=1e-2)
    serve = tmp_path / "serve.json"
    serve.write_text(json.dumps({"results": [
        {"dp_size": 1, "max_batch_size": 8, "requests": 16, "wall_s": 80.0, "images_per_s": 0.2},
        {"dp_size": 8, "max_batch_size": 8, "requests": 16, "wall_s": 11.0, "images_per_s": 1.6}]}))
    png, md = tmp_path / "scaling.png", tmp_path / "rows.md"
    bench_scaling.main(["--report", str(out), "--serve", f"flux={serve}", "--chart", str(png), "--markdown", str(md)])
    assert Image.open(png).size[0] == 1000 and len(Image.open(png).getcolors(1 << 16) or []) > 2
    text = md.read_text()
    assert "| tiny-wan 32x32x5, 3 steps | 1 | 1 |" in text and "| | CFG2 x U2 | 4 |" in text.replace("|  |", "| |")
    assert "| flux | 8 | 8 | 16 | 11.0 s | 1.600 | 8.00x | 1.00 |" in text


def test_server_benchmark_starts_data_parallel_servers() -> None:
    """benchmarks/bench_server_batching.py: the serve flags of a D-replica server and its warm-up size."""
    from argparse import Namespace

    from benchmarks import bench_server_batching as bsb

    args = Namespace(device="cuda", dtype="bf16", requests=16, warmup=1)
    assert bsb.server_args(8, 8, args)[-4:] == ("--num-gpus", "8", "--dp-size", "8")
    assert "--num-gpus" not in bsb.server_args(1, 8, args)
    assert (bsb.warmup_count(args, 1), bsb.warmup_count(args, 8)) == (1, 8)
    assert bsb.warmup_count(Namespace(requests=16, warmup=None), 1) == 16



# ----------------------------------------------------------------------------------------------------------
# Qwen-Image, Qwen-Image-Edit and HunyuanVideo workloads (issues 13 and 14)


def test_engine_names() -> None:
    parse, spec = bench_e2e.parse_engine, bench_e2e.EngineSpec
    assert parse("diffserve+compile[fa3]") == spec("diffserve", compile=True, backend="fa3")
    assert parse("diffserve+compile+vaebf16[cudnn]") == spec("diffserve", compile=True, vae_bf16=True,
                                                              backend="cudnn")
    fuse = [parse(n).fuse for n in ("diffserve+nofuse", "diffserve+fuse", "diffserve")]
    assert fuse == [False, True, None]
    assert parse("diffusers+compile") == spec("diffusers", compile=True)
    assert parse("diffusers+regional") == spec("diffusers", compile=True, regional=True)
    for bad in ("diffserve+compil", "diffusers[fa3]", "diffserve[]", "diffserve+fuse+nofuse",
                "diffusers+compile+regional", "sglang"):
        with pytest.raises(SystemExit):
            parse(bad)


@pytest.mark.parametrize("name,fixture", [("tiny-qwen", "qwen-image"), ("tiny-hunyuan", "hunyuan-video")])
def test_harness_runs_the_same_work_as_diffusers(name: str, fixture: str, tmp_path: Path) -> None:
    """Qwen-Image (true CFG against the negative prompt: two transformer calls per step) and HunyuanVideo
    (embedded guidance; diffusers runs the text padded to 256 with a key mask, diffserve the real tokens
    only): the same image / video as diffusers, the same text, the FLOPs of the replayed calls equal
    step_flops' count on the meta device, one BENCHMARKS.md row per engine."""
    from benchmarks import step_flops
    from diffserve.testing.fixtures import fixture_path

    bench, w = tmp_path / "BENCHMARKS.md", bench_e2e.WORKLOADS[name]
    report = bench_e2e.main([name, "--repo", str(fixture_path(fixture)), "--device", "cpu", "--dtype", "fp32",
                             "--steps", "2", "--benchmarks", str(bench)])
    assert [r["engine"] for r in report["runs"]] == ["diffserve", "diffusers"]
    assert report["output_mean_abs_diff_255_vs_diffusers"]["diffserve"] < 0.01
    lengths = [str(n) for n in step_flops.text_lengths(w)]
    tokens = report["text_tokens_per_call"]
    if name == "tiny-qwen":  # prompt and negative prompt, only their real tokens, in both engines
        assert tokens == {"diffserve": lengths, "diffusers": lengths} and len(lengths) == 2
    else:  # the 40 real tokens of the workload's prompt; diffusers pads them to 256
        assert tokens == {"diffserve": ["40"], "diffusers": ["40 of 256"]} and lengths == ["40"]
    meta = step_flops.count_workload(w)
    assert "replayed" in report["flops_source"]
    counted = report["step_flops"]
    assert (counted["matmul"], counted["attention"]) == (meta.matmul, meta.attention)
    fair = report["fairness"]
    assert (fair["prompt"], fair["negative_prompt"], fair["seed"]) == (w.prompt, w.negative_prompt, 0)
    rows = [line for line in bench.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2 and all(f"| {name} |" in r for r in rows)


@pytest.mark.slow
def test_harness_edit_workload() -> None:
    """Qwen-Image-Edit: the input image reaches both engines (the reference image's tokens follow the noise
    tokens, its vision tokens are in the text), with the same outputs. (Slow-ish: the reference image is
    ~1024x1024 whatever the input size, VAE-encoded on the CPU.)"""
    from benchmarks import step_flops
    from diffserve.testing.fixtures import fixture_path

    w = bench_e2e.WORKLOADS["tiny-qwen-edit"]
    report = bench_e2e.main(["tiny-qwen-edit", "--repo", str(fixture_path("qwen-image-edit")), "--device",
                             "cpu", "--dtype", "fp32", "--steps", "2", "--no-warmup", "--no-roofline"])
    assert report["output_mean_abs_diff_255_vs_diffusers"]["diffserve"] < 0.01
    lengths = [str(n) for n in step_flops.text_lengths(w)]
    assert report["text_tokens_per_call"] == {"diffserve": lengths, "diffusers": lengths}
    ours, theirs = (report["transformer_inputs_first_step"][k][0] for k in ("diffserve", "diffusers"))
    # the output's token grid, then the reference image's
    assert ours["img_shapes"] == theirs["img_shapes"][0] == [[1, 4, 4], [1, 64, 64]]
    assert ours["x"] == theirs["hidden_states"] == [1, 16 + 64 * 64, 64]
    assert report["fairness"]["input_image_wh"] == [64, 64]


def test_merge_failing_engine_and_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two invocations merged into one report (outputs compared across them), an engine that fails (an error
    entry, the next engine runs) and a SIGTERM during an engine (the engines before it are reported)."""
    import os
    import signal
    import time

    from diffserve.testing.fixtures import fixture_path

    out, bench = tmp_path / "report.json", tmp_path / "BENCHMARKS.md"
    common = ["tiny-hunyuan", "--repo", str(fixture_path("hunyuan-video")), "--device", "cpu",
              "--dtype", "fp32", "--steps", "1", "--no-warmup", "--no-roofline", "--out", str(out), "--merge",
              "--outputs", str(tmp_path / "o"), "--benchmarks", str(bench)]
    bench_e2e.main([*common, "--engines", "diffserve"])
    report = bench_e2e.main([*common, "--engines", "diffserve[nosuch],diffusers"])
    assert [r["engine"] for r in report["runs"]] == ["diffserve", "diffusers"]
    assert "unknown attention backend" in report["errors"]["diffserve[nosuch]"]
    # diffserve's output is the first invocation's, read back from --outputs
    assert report["output_mean_abs_diff_255_vs_diffusers"]["diffserve"] < 0.01
    assert report["speedup_vs_diffusers"]["diffusers"] == {"per_step": 1.0, "e2e": 1.0}

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the engine")

    monkeypatch.setattr(bench_e2e, "run_diffusers", terminated)
    before = signal.getsignal(signal.SIGTERM)
    report = bench_e2e.main([*common, "--engines", "diffusers,diffserve"])
    assert signal.getsignal(signal.SIGTERM) == before
    assert report["notes"][0].startswith("stopped by signal 15 during diffusers")
    assert report["notes"][1].startswith("not run: diffserve")
    assert [r["engine"] for r in report["runs"]] == ["diffserve", "diffusers"]  # the earlier calls' runs
    rows = [line for line in bench.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2  # one per engine that ran to its end: diffserve, then diffusers


def test_shallow_text_encoders(tmp_path: Path) -> None:
    """--text-layers: the big text encoders' configs with fewer layers (everything else real), and the
    report's GiB of weights a full-size repo built that way lacks."""
    from diffserve.testing.fixtures import component_plan

    qwen = next(c for c in component_plan("qwen-image", "full") if c.kind == "qwen2_5_vl")
    short = bench_e2e.with_text_layers(qwen, 4).config
    assert short["text_config"]["num_hidden_layers"] == 4 and len(short["text_config"]["layer_types"]) == 4
    assert short["vision_config"] == qwen.config["vision_config"]
    assert qwen.config["text_config"]["num_hidden_layers"] == 28  # the plan itself is untouched
    llama = next(c for c in component_plan("hunyuan-video", "full") if c.kind == "llama")
    (tmp_path / "text_encoder").mkdir()
    config = bench_e2e.with_text_layers(llama, 4).config
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(config))
    depths = bench_e2e.text_encoder_depths(tmp_path, bench_e2e.WORKLOADS["hunyuan-720p"], torch.bfloat16)
    d, ff, kv = 4096, 14336, 1024
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d  # q, o; k, v; gate, up, down; two RMSNorms
    assert depths == {"text_encoder": {"layers": 4, "real_layers": 32,
                                       "gib_not_built": round(28 * per_layer * 2 / 2**30, 2)}}


def test_qwen_step_flops_match_the_architecture() -> None:
    """benchmarks/step_flops.py for Qwen-Image (tiny config, hand count): per call, the image and the text
    stream of every block (q, k, v, out; GELU MLP), its AdaLN modulations, the embedders and the head; one
    joint attention over [text; image] per block."""
    from benchmarks import step_flops
    from diffserve.testing.fixtures import component_plan

    w = bench_e2e.WORKLOADS["tiny-qwen"]
    cfg = next(c.config for c in component_plan("qwen-image", "tiny") if c.name == "transformer")
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    d, img = heads * head_dim, (w.height // 16) * (w.width // 16)

    def mm(tokens: int, k: int, n: int) -> int:
        return 2 * tokens * k * n

    def stream(tokens: int) -> int:
        return 4 * mm(tokens, d, d) + mm(tokens, d, 4 * d) + mm(tokens, 4 * d, d)

    def call(txt: int) -> int:
        block = stream(img) + stream(txt) + 2 * mm(1, d, 6 * d)
        embeds = mm(img, cfg["in_channels"], d) + mm(txt, cfg["joint_attention_dim"], d) + mm(1, 256, d)
        head = mm(1, d, 2 * d) + mm(img, d, 4 * cfg["out_channels"])
        return cfg["num_layers"] * block + embeds + mm(1, d, d) + head

    texts = step_flops.text_lengths(w)
    flops = step_flops.count_workload(w)
    assert flops.matmul == sum(call(t) for t in texts)
    attention = [roofline.attention_flops((1, img + t, heads, head_dim), (1, img + t, heads, head_dim))
                 for t in texts]
    assert flops.attention == cfg["num_layers"] * sum(attention)


def test_scaling_harness_runs_qwen_with_true_cfg(tmp_path: Path) -> None:
    """bench_scaling.py on tiny Qwen-Image: the negative prompt (true CFG) and 2 warm-up steps (its schedule
    needs two) reach the engine; a layout the heads do not allow is an error row."""
    from benchmarks import bench_scaling
    from diffserve.testing.fixtures import fixture_path

    args = ["tiny-qwen", "--repo", str(fixture_path("qwen-image")), "--device", "cpu", "--dtype", "fp32",
            "--steps", "2", "--layouts", "1;u8", "--out", str(tmp_path / "s.json")]
    rows = bench_scaling.main(args)["tiny-qwen"]
    assert rows[0]["per_step_s"] > 0 and rows[0]["mean_abs_diff_255_vs_1gpu"] == 0.0
    assert "does not divide" in rows[1]["error"]
    assert bench_scaling.conditioning(bench_e2e.WORKLOADS["tiny-qwen"]) == {"negative_prompt": " "}
