#!/usr/bin/env bash
# HunyuanVideo 720x1280, 129 frames, embedded guidance 6.0, end to end on one GPU (80 GB H100 or H200, 64 GiB
# disk), one device call (carry .whl: the diffusers, importlib_metadata and fa3_fwd wheels; timeout_s 600):
#   bash benchmarks/gpu/hunyuan_run.sh
# Engines, in this order (ENGINES overrides): diffusers 0.42.1 eager; diffserve --compile on the cuDNN and on the
# FA3 attention kernel. STEPS (default 1) step is timed (diffusers eager: ~32 s per step) and end to end is
# extrapolated to 50 steps: fixed (text encoding, the tiled VAE decode of all 129 frames, the rest; measured
# in the timed run) + 50 x the per-step time. Warm-ups: diffusers eager on a 5-frame clip; diffserve --compile
# one step at the full shape (compilation is never timed); no warm-up decodes the full video (each engine's
# VAE is warmed by decoding a 5-frame clip at 720x1280 instead). The harness stops at 540 s (SIGTERM): the
# engines finished by then are reported and the one cut off is named in the report's notes (run it alone in a
# second call while the machine is warm: ENGINES=... bash ...; the repo and report in $STATE are kept, merged).
#
# Fairness (stated again in the JSON: "fairness", "transformer_inputs_first_step", "text_tokens_per_call"):
# - Same weights: one random-weight repo built from the real configs (bf16, seed 0) on this GPU, written once to
#   /tmp; every engine loads that same folder through its own loader (diffusers: DiffusionPipeline.from_pretrained;
#   diffserve: Engine, as `diffserve generate --model-path` does).
# - The LLaMA text encoder is written with TEXT_LAYERS (default 4) of its 32 layers: real widths, vocabulary and
#   output (the pipeline reads its third hidden state from the end; the transformer gets the same inputs). The
#   whole repo at real depth (~43 GB) would fit the disk but its writing and three loads cost ~1 minute of the
#   10; both engines run the same shallow encoder, so text encoding (part of the fixed cost) is cheaper than
#   the real model's by the same amount for both: the 28 missing layers (6.1 B parameters) would add roughly
#   10 ms per video (351 template tokens; an estimate from their size) against ~25-50 minutes of denoising;
#   each reported peak is lower than a real run's by the weights not built
#   ("fairness.text_encoders.text_encoder.gib_not_built", ~11.4 GiB). TEXT_LAYERS=0 builds the real depth.
# - Same prompt (40 real LLaMA tokens of the 256 it is padded to with the fixtures' tokenizer, as in the anchor;
#   the report gives the count), seed 0, size, frames, guidance, bf16 everywhere (text encoders and VAE
#   included), tiled VAE decode in both (diffusers: pipe.vae.enable_tiling(); diffserve: vae_tiling=True, the
#   same diffusers VAE class and tile sizes).
#   diffusers runs the DiT on all 256 text positions with a key mask; diffserve drops the padding after the
#   last real token, exactly (masked keys get zero weight): the report lists "40 of 256" vs "40".
# Expected time (one H100; estimates, not measured): build ~45 s; diffusers ~100 s; each diffserve --compile
# ~120-140 s (one full-shape warm-up step with compile, the timed step, the tiled decode); ~7-8 min in all.
# Out: $OUT/hunyuan.json (report), hunyuan_bench.txt (log), gpu.txt, BENCHMARKS.md with the new harness rows
# (apply them to the repo's copy); the table comes last.
exec bash "$(dirname "$0")/qwen_run.sh" hunyuan  # the same preamble, harness call and report as Qwen-Image
