"""Multi-GPU inference: the parallel layout and process groups (`mesh`), sequence-parallel DiT transforms
(`sequence`), CFG parallelism (`cfg`). The attention wrappers live in `diffserve.layers.parallel`; the
multi-process engine in `diffserve.engine.parallel_engine`. Design notes: docs/PARALLEL.md."""

from diffserve.parallel.mesh import MeshGroups, ParallelConfig, ParallelConfigError, build_mesh_groups

__all__ = ["MeshGroups", "ParallelConfig", "ParallelConfigError", "build_mesh_groups"]
