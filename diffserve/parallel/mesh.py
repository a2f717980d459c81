"""The parallel layout (`ParallelConfig`) and the process groups cut from one device mesh.

Mesh order, outermost first: (dp, cfg, ring, ulysses). A global rank is

    rank = ((dp_index * cfg + cfg_index) * ring + ring_index) * ulysses + ulysses_index

so the Ulysses group (the all-to-all heavy one) is the most local (adjacent GPUs of one node), the ring
group next, the CFG pair next, and the D data-parallel replicas are contiguous blocks of
`replica_size = cfg * ring * ulysses` ranks. The sequence-parallel rank of a process inside its
(ring x ulysses) group is `ring_index * ulysses + ulysses_index`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch.distributed as dist

from diffserve.errors import UserError
from diffserve.layers.parallel import CommGroup

AXES = ("dp", "cfg", "ring", "ulysses")


class ParallelConfigError(UserError):
    """Parallel flags that do not describe a layout (one-line message naming the flags)."""


def _check_positive(name: str, value: object, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParallelConfigError(f"{name} must be a positive integer, got {value!r}", param=name)


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes (GPUs) and how they are used.

    num_gpus: all processes, over all replicas (None: the product of the other settings).
    ulysses_degree / ring_degree: sequence parallelism inside one replica (None: chosen by `resolve`).
    cfg_parallel: the conditional and unconditional branches of classifier-free guidance on two rank groups.
    dp_size: independent pipeline replicas behind one scheduler.
    The degrees multiply to the GPUs of one replica: cfg (1 or 2) x ring x ulysses == num_gpus / dp_size.
    """

    num_gpus: int | None = None
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    cfg_parallel: bool = False
    dp_size: int = 1

    def __post_init__(self) -> None:
        _check_positive("--num-gpus", self.num_gpus)
        _check_positive("--ulysses-degree", self.ulysses_degree)
        _check_positive("--ring-degree", self.ring_degree)
        _check_positive("--dp-size", self.dp_size, optional=False)
        if not isinstance(self.cfg_parallel, bool):
            got = self.cfg_parallel
            raise ParallelConfigError(f"--enable-cfg-parallel must be true or false, got {got!r}",
                                      param="cfg_parallel")
        self._check_products()

    # -- sizes ---------------------------------------------------------------------------------------------

    @property
    def cfg_degree(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def world_size(self) -> int:
        if self.num_gpus is not None:
            return self.num_gpus
        return self.dp_size * self.cfg_degree * (self.ulysses_degree or 1) * (self.ring_degree or 1)

    @property
    def replica_size(self) -> int:
        return self.world_size // self.dp_size

    @property
    def sp_size(self) -> int:
        """GPUs of a replica that share one sequence (ring x ulysses)."""
        return self.replica_size // self.cfg_degree

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """(dp, cfg, ring, ulysses); only meaningful after `resolve`."""
        return (self.dp_size, self.cfg_degree, self.ring_degree or 1, self.ulysses_degree or 1)

    @property
    def is_resolved(self) -> bool:
        return self.num_gpus is not None and self.ulysses_degree is not None and self.ring_degree is not None

    def describe(self) -> str:
        dp, cfg, ring, uly = self.mesh_shape
        return f"{self.world_size} GPUs: dp {dp} x cfg {cfg} x ring {ring} x ulysses {uly}"

    # -- validation and defaults ---------------------------------------------------------------------------

    def _where(self) -> str:
        return f"(--num-gpus {self.world_size} / --dp-size {self.dp_size})"

    def _check_products(self) -> None:
        world, dp = self.world_size, self.dp_size
        if world % dp:
            raise ParallelConfigError(f"--num-gpus {world} is not a multiple of --dp-size {dp}",
                                      param="dp_size")
        rep = world // dp
        if self.cfg_parallel and rep % 2:
            raise ParallelConfigError(
                f"--enable-cfg-parallel needs an even number of GPUs per replica, got {rep} {self._where()}",
                param="cfg_parallel")
        sp = rep // self.cfg_degree
        u, r = self.ulysses_degree, self.ring_degree
        if u is not None and r is not None and self.cfg_degree * u * r != rep:
            raise ParallelConfigError(
                f"--ulysses-degree {u} x --ring-degree {r} x cfg {self.cfg_degree} = "
                f"{self.cfg_degree * u * r}, "
                f"but a replica has {rep} GPUs {self._where()}; the degrees must multiply to the GPUs of one "
                f"replica", param="ulysses_degree")
        for flag, d in (("--ulysses-degree", u), ("--ring-degree", r)):
            if d is not None and sp % d:
                raise ParallelConfigError(
                    f"{flag} {d} does not divide the {sp} GPUs left for sequence parallelism in a replica "
                    f"{self._where()}{' / cfg 2' if self.cfg_parallel else ''}",
                    param=flag[2:].replace("-", "_"))

    def resolve(self, num_heads: int | None = None) -> ParallelConfig:
        """Every field filled in. Unset degrees: Ulysses takes the largest share of the sequence-parallel
        GPUs that divides the model's head count (all of them when `num_heads` is None), Ring the rest."""
        sp = self.sp_size
        u, r = self.ulysses_degree, self.ring_degree
        if u is None and r is None:
            u = max(d for d in range(1, sp + 1) if sp % d == 0 and (num_heads is None or num_heads % d == 0))
        if u is None:
            u = sp // r  # type: ignore[operator]
        if r is None:
            r = sp // u
        if num_heads is not None and num_heads % u:
            from diffserve.layers.parallel import check_heads

            try:
                check_heads(num_heads, u)
            except ValueError as e:
                raise ParallelConfigError(str(e), param="ulysses_degree") from None
        return ParallelConfig(num_gpus=self.world_size, ulysses_degree=u, ring_degree=r,
                              cfg_parallel=self.cfg_parallel, dp_size=self.dp_size)


# ----------------------------------------------------------------------------------------------------------
# Mesh arithmetic (pure)


@dataclass(frozen=True)
class MeshCoords:
    dp: int
    cfg: int
    ring: int
    ulysses: int


def mesh_coords(rank: int, cfg: ParallelConfig) -> MeshCoords:
    """A global rank's position in the (dp, cfg, ring, ulysses) mesh."""
    _, c, r, u = cfg.mesh_shape
    return MeshCoords(rank // (c * r * u), rank // (r * u) % c, rank // u % r, rank % u)


def mesh_rank(coords: MeshCoords, cfg: ParallelConfig) -> int:
    _, c, r, u = cfg.mesh_shape
    return ((coords.dp * c + coords.cfg) * r + coords.ring) * u + coords.ulysses


def group_ranks(cfg: ParallelConfig, axes: tuple[str, ...]) -> list[tuple[int, ...]]:
    """All groups that vary along `axes` (the others fixed), each as global ranks in mesh order."""
    shape = dict(zip(AXES, cfg.mesh_shape))
    fixed = [a for a in AXES if a not in axes]
    groups = []
    for outer in itertools.product(*(range(shape[a]) for a in fixed)):
        pos = dict(zip(fixed, outer))
        members = []
        for inner in itertools.product(*(range(shape[a]) for a in axes)):
            pos.update(zip(axes, inner))
            members.append(mesh_rank(MeshCoords(**pos), cfg))
        groups.append(tuple(sorted(members)))
    return groups


# ----------------------------------------------------------------------------------------------------------
# Process groups


@dataclass(frozen=True)
class MeshGroups:
    """The groups this rank belongs to. `replica` carries tensors; the `*_ctrl` groups carry Python
    objects (requests, results) and are gloo groups even when the data backend is NCCL."""

    config: ParallelConfig
    rank: int
    coords: MeshCoords
    ulysses: CommGroup
    ring: CommGroup
    sp: CommGroup  # ring x ulysses: the ranks sharing one sequence
    cfg: CommGroup
    replica: CommGroup  # cfg x ring x ulysses
    replica_ctrl: CommGroup
    world_ctrl: CommGroup

    @property
    def replica_index(self) -> int:
        return self.coords.dp

    @property
    def is_replica_leader(self) -> bool:
        return self.replica.rank == 0

    def replica_leader(self, replica: int) -> int:
        """The global rank that speaks for replica `replica`."""
        return replica * self.config.replica_size


def _new_groups(rank: int, all_groups: list[tuple[int, ...]], backend: str | None) -> CommGroup:
    """Create every group of one kind (all ranks must call this, in the same order); return this rank's."""
    mine = CommGroup.single(rank)
    for ranks in all_groups:
        if len(ranks) == 1:
            group = None
        elif len(ranks) == dist.get_world_size() and backend is None:
            group = dist.group.WORLD
        else:
            group = dist.new_group(list(ranks), backend=backend)
        if rank in ranks:
            mine = CommGroup(group, ranks, ranks.index(rank))
    return mine


def build_mesh_groups(cfg: ParallelConfig) -> MeshGroups:
    """Create the process groups of `cfg` (resolved) on the initialised default group. Collective: every
    rank of the world calls it with the same config."""
    if not cfg.is_resolved:
        raise ValueError("build_mesh_groups needs a resolved ParallelConfig (call .resolve() first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != cfg.world_size:
        raise ParallelConfigError(f"the layout needs {cfg.world_size} processes ({cfg.describe()}), "
                                  f"but the process group has {world}")
    ctrl_backend = None if dist.get_backend() == "gloo" else "gloo"

    def make(axes: tuple[str, ...], backend: str | None = None) -> CommGroup:
        return _new_groups(rank, group_ranks(cfg, axes), backend)

    replica_axes = ("cfg", "ring", "ulysses")
    replica = make(replica_axes)
    return MeshGroups(
        config=cfg, rank=rank, coords=mesh_coords(rank, cfg),
        ulysses=make(("ulysses",)), ring=make(("ring",)), sp=make(("ring", "ulysses")), cfg=make(("cfg",)),
        replica=replica, replica_ctrl=make(replica_axes, ctrl_backend) if ctrl_backend else replica,
        world_ctrl=make(AXES, ctrl_backend),
    )


def parallel_config_from_args(args: object) -> ParallelConfig | None:
    """The layout asked for by the CLI flags (`--num-gpus`, `--ulysses-degree`, `--ring-degree`,
    `--enable-cfg-parallel`, `--dp-size` on an argparse namespace); None when none was given."""
    cfg = ParallelConfig(num_gpus=getattr(args, "num_gpus", None),
                         ulysses_degree=getattr(args, "ulysses_degree", None),
                         ring_degree=getattr(args, "ring_degree", None),
                         cfg_parallel=bool(getattr(args, "enable_cfg_parallel", False)),
                         dp_size=getattr(args, "dp_size", 1))
    return cfg if cfg != ParallelConfig() else None
