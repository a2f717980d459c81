"""CFG parallelism: the conditional branch on cfg rank 0, the unconditional one on cfg rank 1, both
predictions on both ranks after every step.

It is a branch runner of the shared denoising stage (`pipelines.stages.denoise.BranchRunner`): the stage
evaluates its two CFG branches through `stage.branches`, sequentially by default. `CfgParallel` runs one
branch per rank and all-gathers the two predictions; the stage then applies its own guidance combine (plain
CFG, norm-rescaled CFG, ...) to identical tensors on both ranks, so the ranks step the sampler identically
and the result is the single-process one. `install_cfg_parallel` puts the runner on a pipeline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffserve.layers.parallel import CommGroup
from diffserve.pipelines.base import ComposedPipeline
from diffserve.pipelines.stages.denoise import Branch, Cond, DenoisingStage


class CfgParallel:
    """Runs one CFG branch per rank of a 2-rank group and returns (cond, uncond) predictions on both."""

    def __init__(self, group: CommGroup) -> None:
        if group.size != 2:
            raise ValueError(f"CFG parallelism needs a group of 2 ranks, got {group.size}")
        self.group = group

    def __call__(self, branch: Branch, cond: Cond, uncond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        mine = branch(cond if self.group.rank == 0 else uncond).contiguous()
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine, group=self.group.group)
        return parts[0], parts[1]


def install_cfg_parallel(pipeline: ComposedPipeline, group: CommGroup, uses_cfg: bool) -> None:
    """Make the pipeline's denoising stage run its CFG branches on the two ranks of `group` (a
    ParallelConfigError if the model has no CFG branch)."""
    from diffserve.parallel.mesh import ParallelConfigError

    stages = [s for s in pipeline.stages if isinstance(s, DenoisingStage) and s.uses_cfg]
    if not uses_cfg or not stages:
        raise ParallelConfigError(
            f"--enable-cfg-parallel: {pipeline.name} has no classifier-free guidance branch to split (it applies "
            f"to models with a negative prompt: Wan, Qwen-Image, HunyuanVideo with true CFG)", param="cfg_parallel")
    for stage in stages:
        stage.branches = CfgParallel(group)
