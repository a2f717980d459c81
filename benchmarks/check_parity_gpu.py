"""GPU parity diagnostics: diffserve vs diffusers stage by stage on one full-size checkpoint (bf16).

    python benchmarks/check_parity_gpu.py --repo DIR [--steps 4]

Prints the relative error of prompt embeddings, one transformer forward (per attention backend) and
the final latents/pixels after a few steps, so a divergence can be pinned to one stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPT = "a red fox jumping over a frozen river at sunrise"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def main() -> None:
    import diffusers

    from diffserve import Engine, GenerationRequest
    from diffserve.pipelines.base import PipelineState

    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    out: dict = {}
    dev = torch.device("cuda")
    pipe = diffusers.FluxPipeline.from_pretrained(args.repo, torch_dtype=torch.bfloat16).to(dev)
    pipe.set_progress_bar_config(disable=True)
    eng = Engine.from_pretrained(str(args.repo), dtype="bf16", device="cuda")
    c = eng.pipeline.components
    out["attention_default"] = eng.attention.backend
    # 1. prompt embeddings
    pe, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, device=dev, max_sequence_length=512)
    st = PipelineState(requests=[GenerationRequest(prompt=PROMPT)], device=dev, dtype=torch.bfloat16)
    eng.pipeline.stages[0].run(st)
    eng.pipeline.stages[1].run(st)
    out["prompt_embeds_rel"] = rel(st.cond["prompt_embeds"], pe)
    out["pooled_rel"] = rel(st.cond["pooled"], pooled)
    # 2. one transformer forward on identical inputs, several attention backends
    g = torch.Generator("cpu").manual_seed(0)
    n = (args.size // 16) ** 2
    x = torch.randn(1, n, 64, generator=g).to(dev, torch.bfloat16)
    h2 = args.size // 16
    ids = torch.zeros(h2, h2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(h2)[None, :]
    img_ids = ids.reshape(-1, 3).to(dev, torch.bfloat16)
    txt_ids = torch.zeros(pe.shape[1], 3, device=dev, dtype=torch.bfloat16)
    t = torch.full((1,), 0.7, device=dev, dtype=torch.bfloat16)
    gd = torch.full((1,), 3.5, device=dev)
    ref = pipe.transformer(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t,
                           img_ids=img_ids, txt_ids=txt_ids, guidance=gd, return_dict=False)[0]
    for backend in ("sdpa", "cudnn", "flash", "efficient", "math"):
        try:
            eng.attention.configure(backend=backend)
            got = c.transformer(x, pe, pooled, t, img_ids, txt_ids, gd)
            out[f"forward_rel[{backend}]"] = rel(got, ref)
        except RuntimeError as e:
            out[f"forward_rel[{backend}]"] = f"error: {str(e)[:80]}"
    eng.attention.configure(backend=out["attention_default"])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel([kind]):
            r2 = pipe.transformer(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t,
                                  img_ids=img_ids, txt_ids=txt_ids, guidance=gd, return_dict=False)[0]
        out[f"diffusers_forward_rel[{name} vs default]"] = rel(r2, ref)
    print(json.dumps(out, indent=1), flush=True)
    # 3. a few steps: latents
    kw = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=3.5)
    lat_ref = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **kw).images
    st = PipelineState(requests=[GenerationRequest(prompt=PROMPT, seed=0, **kw)], device=dev, dtype=torch.bfloat16)
    for stage in eng.pipeline.stages[:-1]:
        stage.run(st)
    out["latents_after_steps_rel"] = rel(st.latents, lat_ref)
    for steps in (1, 2):
        kw["num_inference_steps"] = steps
        lr = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **kw).images
        st = PipelineState(requests=[GenerationRequest(prompt=PROMPT, seed=0, **kw)], device=dev, dtype=torch.bfloat16)
        for stage in eng.pipeline.stages[:-1]:
            stage.run(st)
        out[f"latents_after_{steps}_steps_rel"] = rel(st.latents, lr)
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
