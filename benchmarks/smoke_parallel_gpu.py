"""Multi-GPU smoke test: tiny Wan (and FLUX) on several GPUs equal the 1-GPU output.

    python benchmarks/smoke_parallel_gpu.py            # fp32, eager: Wan on 2 and 4 GPUs, exact
    python benchmarks/smoke_parallel_gpu.py --compile  # bf16, --compile (kernel fusions on), 2 GPUs,
                                                       # FLUX and Wan, within bf16 rounding
"""

import argparse

import numpy as np

from diffserve import Engine
from diffserve.parallel import ParallelConfig
from diffserve.testing.fixtures import fixture_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    dtype = "bf16" if args.compile else "fp32"
    cases = [("wan-t2v", dict(height=32, width=32, num_frames=9, num_inference_steps=2, seed=1),
              [ParallelConfig(num_gpus=2, ulysses_degree=2), ParallelConfig(num_gpus=2, cfg_parallel=True)]
              + ([] if args.compile else [ParallelConfig(num_gpus=4, ulysses_degree=2, ring_degree=2)]))]
    if args.compile:
        cases.append(("flux-dev", dict(height=64, width=64, num_inference_steps=2, seed=1),
                      [ParallelConfig(num_gpus=2, ulysses_degree=2), ParallelConfig(num_gpus=2, ring_degree=2)]))
    for name, kw, layouts in cases:
        repo = str(fixture_path(name))

        def pixels(engine, kw: dict = kw) -> np.ndarray:
            r = engine.generate("a cat", **kw)
            return np.asarray(r.videos[0] if r.videos else r.images[0], dtype=float)

        ref = pixels(Engine.from_pretrained(repo, dtype=dtype, device="cuda", compile=args.compile))
        for cfg in layouts:
            e = Engine.from_pretrained(repo, dtype=dtype, device="cuda", parallel=cfg, compile=args.compile)
            got = pixels(e)
            e.close()
            print(name, cfg, "max / mean abs diff (0-255):", np.abs(got - ref).max(), np.abs(got - ref).mean(),
                  flush=True)
    print("SMOKE OK")


if __name__ == "__main__":
    main()
