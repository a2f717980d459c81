"""Multi-GPU smoke test: tiny Wan on 2 and 4 GPUs equals the 1-GPU output (fp32)."""

import numpy as np

from diffserve import Engine
from diffserve.parallel import ParallelConfig
from diffserve.testing.fixtures import fixture_path


def main() -> None:
    repo = str(fixture_path("wan-t2v"))
    kw = dict(height=32, width=32, num_frames=9, num_inference_steps=2, seed=1)
    ref = Engine.from_pretrained(repo, dtype="fp32", device="cuda").generate("a cat", **kw).videos[0].astype(float)
    for cfg in (ParallelConfig(num_gpus=2, ulysses_degree=2), ParallelConfig(num_gpus=2, cfg_parallel=True),
                ParallelConfig(num_gpus=4, ulysses_degree=2, ring_degree=2)):
        e = Engine.from_pretrained(repo, dtype="fp32", device="cuda", parallel=cfg)
        got = e.generate("a cat", **kw).videos[0].astype(float)
        e.close()
        print(cfg, "max abs diff (0-255):", np.abs(got - ref).max(), flush=True)
    print("SMOKE OK")


if __name__ == "__main__":
    main()
