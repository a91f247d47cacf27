"""ParallelDims: a layout's degrees, validated once, from the config check to every worker.

Five mesh dimensions, outermost first: ``pp x dp_replicate x dp_shard x cp x tp``. Tensor parallelism is
innermost so its ranks are neighbours (the same node, the fastest links); pipeline parallelism is
outermost so its point-to-point traffic is what crosses nodes (Megatron-LM's ordering; torchtitan's
``ParallelDims``). Expert parallelism is not a dimension of its own: it splits the ranks holding
distinct tokens (``dp x cp``) into ``ep`` groups.

Pure arithmetic (no torch, no process group): ``config/checks.py`` builds it before any process starts,
the launcher hands it to the workers, ``primitives.ParallelState`` turns it into a device mesh, and
planning sizes its candidate layouts with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of a layout on ``world_size`` ranks. One of the five mesh degrees may be -1: it takes
    what the others leave. Raises ``ValueError`` naming the sizes when they do not multiply to the world."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in DIMS}
        for name, size in {**given, "world_size": self.world_size}.items():
            if not isinstance(size, int) or (size < 1 and not (size == -1 and name != "world_size")):
                raise ValueError(f"parallel degree {name}={size!r}: expected a positive integer or -1")
        free = [name for name, size in given.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"only one parallel degree may be -1, got {free}")
        fixed = math.prod(size for size in given.values() if size != -1)
        if free:
            if self.world_size % fixed:
                fixed_text = " x ".join(f"{n}={s}" for n, s in given.items() if s != -1)
                raise ValueError(
                    f"world size {self.world_size} is not divisible by {fixed_text} = {fixed},"
                    f" so {free[0]} cannot fill it"
                )
            object.__setattr__(self, free[0], self.world_size // fixed)
        product = math.prod(getattr(self, name) for name in DIMS)
        if product != self.world_size:
            raise ValueError(
                f"the parallel degrees {self.mesh_text()} multiply to {product},"
                f" but the world size is {self.world_size}"
            )
        if not isinstance(self.ep, int) or self.ep < 1:
            raise ValueError(f"parallel degree ep={self.ep!r}: expected a positive integer")
        if self.dp_cp % self.ep:
            raise ValueError(
                f"ep={self.ep} must divide the {self.dp_cp} ranks holding distinct tokens "
                f"(dp={self.dp} x cp={self.cp}), from which expert parallelism takes its ranks"
            )

    @classmethod
    def from_degrees(
        cls, *, dp_replicate: int = 1, dp_shard: int = 1, cp: int = 1, tp: int = 1, pp: int = 1, ep: int = 1
    ) -> ParallelDims:
        """The layout of these degrees, on as many ranks as they multiply to (a candidate of planning)."""
        world = dp_replicate * dp_shard * cp * tp * pp
        return cls(world, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, pp=pp, ep=ep)

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Ranks that hold different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        """Ranks that hold distinct tokens: different samples, or different parts of one sequence."""
        return self.dp * self.cp

    @property
    def shape(self) -> tuple[int, ...]:
        """The mesh's shape, in ``DIMS`` order."""
        return tuple(getattr(self, name) for name in DIMS)

    # -- which dimensions are on ------------------------------------------------------------------

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def mesh_text(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in DIMS)

    def __str__(self) -> str:
        text = self.mesh_text()
        return f"{text} (ep={self.ep} of dp x cp)" if self.ep > 1 else text
