"""Parallel layout arithmetic and pure helpers (no processes): ParallelConfig validation and defaults, the
mesh, the DP scheduler, sharding/padding, the all-to-all reshapes, the log-sum-exp merge, the CLI flags."""

from __future__ import annotations

import pytest
import torch

from diffserve.config import GenerationRequest
from diffserve.engine.parallel_engine import needs_parallel_engine
from diffserve.engine.ranks import assign_batches, split_requests, torchrun_env
from diffserve.layers.attention import sdpa_attention
from diffserve.layers.parallel import (
    heads_to_send_order,
    math_attention_lse,
    merge_partials,
    received_to_heads,
    received_to_sequence,
    sdpa_attention_lse,
    sequence_to_send_order,
)
from diffserve.parallel.mesh import (
    ParallelConfig,
    ParallelConfigError,
    group_ranks,
    mesh_coords,
    mesh_rank,
    parallel_config_from_args,
)
from diffserve.parallel.sequence import segments_layout, take_shard, valid_counts


@pytest.mark.parametrize("kwargs, message", [
    ({"num_gpus": 4, "ulysses_degree": 2, "ring_degree": 1},
     ("--ulysses-degree 2 x --ring-degree 1 x cfg 1 = 2, but a replica has 4 GPUs "
      "(--num-gpus 4 / --dp-size 1); the degrees must multiply to the GPUs of one replica")),
    ({"num_gpus": 8, "ulysses_degree": 2, "ring_degree": 2, "cfg_parallel": True, "dp_size": 2},
     "--ulysses-degree 2 x --ring-degree 2 x cfg 2 = 8, but a replica has 4 GPUs"),
    ({"num_gpus": 6, "dp_size": 4}, "--num-gpus 6 is not a multiple of --dp-size 4"),
    ({"num_gpus": 3, "cfg_parallel": True},
     "--enable-cfg-parallel needs an even number of GPUs per replica, got 3"),
    ({"num_gpus": 6, "ulysses_degree": 4}, "--ulysses-degree 4 does not divide the 6 GPUs left for sequence"),
    ({"num_gpus": 4, "ring_degree": 3}, "--ring-degree 3 does not divide the 4 GPUs"),
    ({"num_gpus": 0}, "--num-gpus must be a positive integer, got 0"),
    ({"num_gpus": 2, "dp_size": 0}, "--dp-size must be a positive integer, got 0"),
    ({"ulysses_degree": -1}, "--ulysses-degree must be a positive integer, got -1"),
])
def test_config_errors_are_one_clear_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ParallelConfigError) as err:
        ParallelConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_and_resolution() -> None:
    assert ParallelConfig().world_size == 1 and not needs_parallel_engine(ParallelConfig())
    assert needs_parallel_engine(ParallelConfig(num_gpus=2))
    # only --num-gpus: all of it to Ulysses when the heads allow, the rest to Ring
    assert ParallelConfig(num_gpus=8).resolve(num_heads=24).mesh_shape == (1, 1, 1, 8)
    assert ParallelConfig(num_gpus=8).resolve(num_heads=12).mesh_shape == (1, 1, 2, 4)
    assert ParallelConfig(num_gpus=4).resolve(num_heads=3).mesh_shape == (1, 1, 4, 1)
    assert ParallelConfig(num_gpus=8, cfg_parallel=True, dp_size=2).resolve(40).mesh_shape == (2, 2, 1, 2)
    assert ParallelConfig(num_gpus=4, ring_degree=2).resolve(2).mesh_shape == (1, 1, 2, 2)
    # no --num-gpus: the product of the degrees
    cfg = ParallelConfig(ulysses_degree=2, ring_degree=2, cfg_parallel=True, dp_size=2)
    assert cfg.world_size == 16 and cfg.replica_size == 8 and cfg.sp_size == 4
    heads_error = r"does not divide the model's 2 attention heads; use a Ulysses degree among \[1, 2\]"
    with pytest.raises(ParallelConfigError, match=heads_error):
        ParallelConfig(num_gpus=4, ulysses_degree=4).resolve(num_heads=2)


def test_mesh_order() -> None:
    cfg = ParallelConfig(num_gpus=16, ulysses_degree=2, ring_degree=2, cfg_parallel=True, dp_size=2).resolve()
    for rank in range(16):
        assert mesh_rank(mesh_coords(rank, cfg), cfg) == rank
    assert mesh_coords(13, cfg).__dict__ == {"dp": 1, "cfg": 1, "ring": 0, "ulysses": 1}
    assert group_ranks(cfg, ("ulysses",))[:2] == [(0, 1), (2, 3)]
    assert group_ranks(cfg, ("ring",))[:2] == [(0, 2), (1, 3)]
    assert group_ranks(cfg, ("ring", "ulysses"))[:2] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert group_ranks(cfg, ("cfg",))[:2] == [(0, 4), (1, 5)]
    assert group_ranks(cfg, ("cfg", "ring", "ulysses")) == [tuple(range(8)), tuple(range(8, 16))]
    for axes in (("ulysses",), ("ring",), ("cfg",), ("dp",)):  # every axis partitions the world
        flat = sorted(r for g in group_ranks(cfg, axes) for r in g)
        assert flat == list(range(16))


def test_dp_scheduler() -> None:
    assert assign_batches([5, 1, 1, 3], 2) == [[0], [1, 2, 3]]
    assert assign_batches([1, 1, 1], 4) == [[0], [1], [2], []]
    reqs = [GenerationRequest(prompt=str(i), num_outputs=n) for i, n in enumerate([1, 1, 2, 1])]
    assert [[r.prompt for r in c] for c in split_requests(reqs, 2)] == [["0", "1"], ["2", "3"]]
    assert [[r.prompt for r in c] for c in split_requests(reqs[:1], 3)] == [["0"]]
    assert len(split_requests(reqs, 1)) == 1


def test_torchrun_env() -> None:
    assert torchrun_env({}) is None
    env = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1"})
    assert env is not None
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)


def test_sharding_with_padding() -> None:
    assert valid_counts(7, 4) == [2, 2, 2, 1] and valid_counts(3, 4) == [1, 1, 1, 0]
    x = torch.arange(7.0).view(1, 7, 1)
    shards = [take_shard(x, 1, p, 4) for p in range(4)]
    assert all(s.shape == (1, 2, 1) for s in shards)
    assert torch.equal(torch.cat(shards, 1)[:, :7], x) and shards[3][0, 1, 0] == 0
    layout = segments_layout([3, 5], 2)  # FLUX-like [text; image] per rank
    assert layout.local_len == 5
    assert layout.valid.tolist() == [[True, True, True, True, True], [True, False, True, True, False]]
    assert segments_layout([4, 6], 2).valid is None


def test_all_to_all_reshapes_round_trip() -> None:
    """Simulate the Ulysses all-to-all with tensor ops: scatter then gather is the identity, and the
    scattered view holds whole sequences of a head slice."""
    parts, b, ls, h, d = 2, 1, 3, 4, 5
    shards = [torch.randn(b, ls, h, d) for _ in range(parts)]
    sent = [heads_to_send_order(s, parts) for s in shards]  # [rank][dest]
    received = [torch.stack([sent[src][dst] for src in range(parts)]) for dst in range(parts)]
    seq = [received_to_sequence(r) for r in received]
    assert torch.equal(seq[1], torch.cat(shards, 1)[:, :, 2:])
    back_sent = [sequence_to_send_order(s, parts) for s in seq]
    back = [received_to_heads(torch.stack([back_sent[src][dst] for src in range(parts)]))
            for dst in range(parts)]
    assert all(torch.equal(a, c) for a, c in zip(back, shards))


def test_lse_merge_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    ref = sdpa_attention(q, k, v)
    out_a, lse_a = sdpa_attention_lse(q, k[:, :2], v[:, :2])
    out_b, lse_b = math_attention_lse(q, k[:, 2:], v[:, 2:])
    merged, lse = merge_partials(out_a.float(), lse_a, out_b, lse_b)
    assert (merged - ref).abs().max() < 1e-6
    assert (lse - math_attention_lse(q, k, v)[1]).abs().max() < 1e-5


def test_cli_flags() -> None:
    from diffserve.cli import build_parser

    base = ["generate", "--model-path", "m", "--prompt", "p"]
    args = build_parser().parse_args(base + ["--num-gpus", "8", "--ulysses-degree", "2", "--ring-degree", "2",
                                             "--enable-cfg-parallel", "--dp-size", "1"])
    assert parallel_config_from_args(args) == ParallelConfig(num_gpus=8, ulysses_degree=2, ring_degree=2,
                                                             cfg_parallel=True)
    assert parallel_config_from_args(build_parser().parse_args(base)) is None
    serve = build_parser().parse_args(["serve", "--model-path", "m", "--num-gpus", "2", "--dp-size", "2"])
    assert parallel_config_from_args(serve) == ParallelConfig(num_gpus=2, dp_size=2)


def test_cli_reports_bad_layout(capsys: pytest.CaptureFixture[str]) -> None:
    from diffserve.cli import main

    rc = main(["generate", "--model-path", "unused", "--prompt", "p", "--num-gpus", "4",
               "--ulysses-degree", "3"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("diffserve: error: --ulysses-degree 3 does not divide the 4 GPUs left for sequence "
                    "parallelism in a replica (--num-gpus 4 / --dp-size 1)")]
