"""The multi-process engine end to end on CPU (gloo): data-parallel replicas spawned by the engine, and a
two-"node" torchrun world on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffserve import Engine, GenerationRequest
from diffserve.engine.parallel_engine import ParallelEngine
from diffserve.engine.ranks import free_port
from diffserve.errors import CancelledError, InvalidRequestError
from diffserve.parallel import ParallelConfig

WAN = {"height": 32, "width": 16, "num_frames": 5, "num_inference_steps": 2, "max_sequence_length": 8}
FLUX = {"height": 20, "width": 12, "num_inference_steps": 2, "max_sequence_length": 7}


@pytest.fixture(scope="module")
def wan_repo() -> Path:
    from diffserve.testing.fixtures import fixture_path

    return fixture_path("wan-t2v")


@pytest.fixture(scope="module")
def wan_single(wan_repo: Path) -> Engine:
    return Engine.from_pretrained(str(wan_repo), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def wan_dp2(wan_repo: Path):
    engine = Engine.from_pretrained(str(wan_repo), dtype="fp32", device="cpu",
                                    parallel=ParallelConfig(num_gpus=2, dp_size=2))
    yield engine
    engine.close()


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_dp_replicas_match_single_process(wan_dp2: ParallelEngine, wan_single: Engine) -> None:
    assert isinstance(wan_dp2, ParallelEngine)
    assert wan_dp2.parallel == ParallelConfig(num_gpus=2, ulysses_degree=1, ring_degree=1, dp_size=2)
    assert wan_dp2.defaults == wan_single.defaults and wan_dp2.pipeline_class == "WanPipeline"
    reqs = [GenerationRequest(prompt="a red fox", negative_prompt="blurry", seed=1, **WAN),
            GenerationRequest(prompt="a blue bird", seed=2, **WAN)]
    steps: list[int] = []
    got = wan_dp2.generate_batch(reqs, on_step=lambda done, total: steps.append(done))
    assert [r.seed for r in got] == [1, 2] and steps == [1, 2]
    for req, res in zip(reqs, got):  # each replica ran one request: the same numbers as alone in one process
        ref = wan_single.generate_batch([req])[0]
        diff = _max_diff(res.videos[0], ref.videos[0])
        print(f"DP=2 replica result vs single process ({req.prompt!r}): max |uint8 diff| = {diff}")
        assert res.videos[0].shape == ref.videos[0].shape and diff == 0


def test_generate_batches_spreads_and_keeps_order(wan_dp2: ParallelEngine) -> None:
    batches = [[GenerationRequest(prompt=f"prompt {i}", seed=10 + i, **WAN)] for i in range(3)]
    out = wan_dp2.generate_batches(batches)
    assert [[r.seed for r in b] for b in out] == [[10], [11], [12]]
    again = wan_dp2.generate(prompt="prompt 1", seed=11, **WAN)
    assert _max_diff(again.videos[0], out[1][0].videos[0]) == 0


def test_errors_and_cancellation_keep_engine_usable(wan_dp2: ParallelEngine) -> None:
    with pytest.raises(InvalidRequestError, match="height=17"):
        wan_dp2.validate(GenerationRequest(prompt="x", height=17))
    with pytest.raises(InvalidRequestError, match="height=17"):
        wan_dp2.generate("x", **{**WAN, "height": 17})
    with pytest.raises(CancelledError):
        wan_dp2.generate("x", should_stop=lambda: True, **WAN)
    assert wan_dp2.validate(GenerationRequest(prompt="x", seed=3)).height == wan_dp2.defaults.height
    assert wan_dp2.generate("x", seed=3, **WAN).videos[0].shape == (5, 32, 16, 3)


def test_layout_errors_before_any_process(wan_repo: Path) -> None:
    from diffserve.parallel import ParallelConfigError

    with pytest.raises(ParallelConfigError, match="does not divide the model's 2 attention heads"):
        Engine.from_pretrained(str(wan_repo), device="cpu",
                               parallel=ParallelConfig(num_gpus=4, ulysses_degree=4))
    with pytest.raises(ParallelConfigError, match="must multiply to the GPUs of one replica"):
        Engine.from_pretrained(str(wan_repo), device="cpu",
                               parallel=ParallelConfig(num_gpus=4, ulysses_degree=2, ring_degree=1))


def test_start_up_error_reaches_the_caller() -> None:
    """A layout that fails once the model is known (FLUX has no CFG branch) is raised from the worker
    ranks as the same UserError, and the workers are gone."""
    from diffserve.parallel import ParallelConfigError
    from diffserve.testing.fixtures import fixture_path

    with pytest.raises(ParallelConfigError, match="FluxPipeline has no classifier-free guidance"):
        Engine.from_pretrained(str(fixture_path("flux-dev")), dtype="fp32", device="cpu",
                               parallel=ParallelConfig(num_gpus=2, cfg_parallel=True))


TORCHRUN_SCRIPT = """
import json
import sys

import numpy as np

from diffserve import Engine
from diffserve.parallel import ParallelConfig

repo, out, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
engine = Engine.from_pretrained(repo, dtype="fp32", device="cpu",
                                parallel=ParallelConfig(ulysses_degree=2, ring_degree=2))
# only global rank 0 gets here; the other ranks serve it and exit when it closes the engine
assert engine.parallel.describe() == "4 GPUs: dp 1 x cfg 1 x ring 2 x ulysses 2", engine.parallel
res = engine.generate("a red fox", **params)
np.save(out, np.stack([np.asarray(im) for im in res.images]))
engine.close()
"""


def test_two_nodes_under_torchrun(tmp_path: Path) -> None:
    """Two torchrun agents ("nodes") of 2 processes each on loopback form one world of 4: Ulysses inside a
    node, Ring across the nodes. Rank 0 generates; the result equals the single-process one."""
    from diffserve.testing.fixtures import fixture_path

    repo = str(fixture_path("flux-dev"))
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    params = {"seed": 4, "num_outputs": 2, **FLUX}
    out = tmp_path / "images.npy"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(script), repo, str(out), json.dumps(params)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    logs = [n.communicate(timeout=240)[0] for n in nodes]
    for node, (proc, log) in enumerate(zip(nodes, logs)):
        assert proc.returncode == 0, f"node {node} failed:\n{log[-4000:]}"
    got = np.load(out)
    single = Engine.from_pretrained(repo, dtype="fp32", device="cpu")
    ref = np.stack([np.asarray(im) for im in single.generate("a red fox", **params).images])
    diff = _max_diff(got, ref)
    print(f"torchrun 2 nodes x 2 (U2xR2) vs single process: max |uint8 diff| = {diff}")
    assert got.shape == ref.shape and diff <= 1
