"""CFG parallelism: the conditional branch on cfg rank 0, the unconditional one on cfg rank 1, combined
after every step so both ranks continue from the same guided prediction.

Integration is one explicit hook: a denoising stage that supports it has a `cfg_parallel` attribute
(None by default, i.e. the single-process path) and, when it is set, calls

    v = stage.cfg_parallel(lambda cond: model(..., cond, ...), cond, uncond, scale)

instead of its two model calls. `install_cfg_parallel` sets the attribute on a pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from diffserve.layers.parallel import CommGroup

C = TypeVar("C")


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, written exactly as the single-process stages do."""
    return uncond + scale * (cond - uncond)


class CfgParallel:
    """Runs one branch per rank of a 2-rank group and returns the guided prediction on both."""

    def __init__(self, group: CommGroup) -> None:
        if group.size != 2:
            raise ValueError(f"CFG parallelism needs a group of 2 ranks, got {group.size}")
        self.group = group

    def __call__(self, branch: Callable[[C], torch.Tensor], cond: C, uncond: C, scale: float) -> torch.Tensor:
        mine = branch(cond if self.group.rank == 0 else uncond).contiguous()
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine, group=self.group.group)
        return guided(parts[0], parts[1], scale)


def install_cfg_parallel(pipeline: object, group: CommGroup, uses_cfg: bool) -> None:
    """Give the pipeline's denoising stage the CFG-parallel hook (error if the model has no CFG branch)."""
    from diffserve.parallel.mesh import ParallelConfigError

    name = getattr(pipeline, "name", type(pipeline).__name__)
    stages = [s for s in getattr(pipeline, "stages", []) if hasattr(s, "cfg_parallel")]
    if not uses_cfg or not stages:
        raise ParallelConfigError(
            f"--enable-cfg-parallel: {name} has no classifier-free guidance branch to split (it applies to "
            f"models with a negative prompt, e.g. Wan)", param="cfg_parallel")
    for stage in stages:
        stage.cfg_parallel = CfgParallel(group)
