"""Where the pieces of the step live: which rank serves which shard, which rank is which worker.

The step itself (:mod:`dist_quant.ps.sync_step`, arithmetic in
:mod:`dist_quant.ps.shard` and :mod:`dist_quant.ps.worker`) is the same for every
topology; a :class:`Placement` only says on which rank each piece runs:

=============  =====================  ==============================  ========================
topology       ranks (rank order)     server of shard s               worker i
=============  =====================  ==============================  ========================
star           W + 1                  rank 0 (one shard: all of it)   rank 1 + i
sharded        W + S                  rank s                          rank S + i
colocated      W                      rank s (S = W)                  rank i (the same ranks)
=============  =====================  ==============================  ========================

With ``DIST_QUANT_ROLE`` on every rank (``server``, ``worker``, or ``colocated`` for the
colocated job) the servers and the workers are numbered in rank order instead, unless every
worker rank also has ``DIST_QUANT_WORKER=I`` (0-based, each index once): then rank with
``I`` is worker ``I`` (the namespace cluster ties worker I to host ``w{I+1}`` this way, so
that ``--worker-rate I=...`` and ``--slow-worker I=...`` name the same worker). The leader, the
server of shard 0, evaluates, records the metrics and writes the checkpoints.

Shards. The flat parameter vector (``model.parameters()`` order) is cut into S contiguous
shards on uplink bucket boundaries (so no bucket straddles two servers), balanced by size:
with ``B`` buckets of ``bucket_size`` (the last may be short), shard ``s`` holds buckets
``round(s B / S)`` up to ``round((s + 1) B / S)``. With W = 3 colocated servers the shards
are unequal by at most one bucket.

Bytes per step (``up(m)``/``down(m)``: the compressors' ``payload_nbytes(m)``; ``n_s``: shard
s's coordinates; ``r_s``: the workers on another rank than server s, W for dedicated servers
and W - 1 colocated). Server s's link carries ``r_s * up(n_s)`` in and ``r_s * down(n_s)`` out;
a payload that stays on its rank crosses no link and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError

ROLES = ("server", "worker", "colocated")


def shard_bounds(n: int, bucket_size: int, shards: int,
                 option: str = "--servers") -> list[tuple[int, int]]:
    """``[(lo, hi)]`` of ``shards`` contiguous shards of ``n`` coordinates on bucket
    boundaries (``bucket_size`` 0 = every coordinate is a boundary), balanced by buckets;
    ConfigError naming ``option`` when there are fewer buckets than shards."""
    unit = bucket_size or 1
    buckets = -(-n // unit)
    if shards > buckets:
        raise ConfigError(option, f"{shards} shards need at least {shards} buckets; the "
                          f"model's {n} parameters make {buckets} buckets of {unit}")
    cuts = [min(round(s * buckets / shards) * unit, n) for s in range(shards + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@dataclass(frozen=True)
class Placement:
    bounds: tuple[tuple[int, int], ...]   # shard s = coordinates [lo, hi)
    server_ranks: tuple[int, ...]         # the rank serving shard s
    worker_ranks: tuple[int, ...]         # the rank of worker i

    @property
    def leader(self) -> int:
        return self.server_ranks[0]

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.server_ranks) | set(self.worker_ranks))

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def shard_of(self, rank: int) -> int | None:
        return self.server_ranks.index(rank) if rank in self.server_ranks else None

    def worker_of(self, rank: int) -> int | None:
        return self.worker_ranks.index(rank) if rank in self.worker_ranks else None

    def remote_workers(self, shard: int) -> int:
        """How many workers reach server ``shard`` over a link (not on its own rank)."""
        return sum(r != self.server_ranks[shard] for r in self.worker_ranks)

    def describe(self, rank: int) -> str:
        parts = []
        if rank in self.server_ranks:
            s = self.server_ranks.index(rank)
            parts.append("the server" if self.num_shards == 1 else f"server {s}")
        if rank in self.worker_ranks:
            parts.append(f"worker {self.worker_ranks.index(rank)}")
        return f"rank {rank} ({' and '.join(parts)})"


def place(cfg: TrainConfig, n: int, roles: list[str] | None = None,
          indices: list[int | None] | None = None) -> Placement:
    """The placement of ``cfg``'s job for a model of ``n`` parameters; ``roles[r]`` is rank
    r's ``DIST_QUANT_ROLE`` (None or all empty: from rank order), ``indices[r]`` its
    ``DIST_QUANT_WORKER`` (None: unset)."""
    bounds = tuple(shard_bounds(n, cfg.bucket_size, cfg.num_shards,
                                "--workers" if cfg.colocate else "--servers"))
    world, servers = cfg.world_size, cfg.num_shards
    if roles is not None and any(roles):
        return _by_index(_from_roles(cfg, bounds, roles), indices)
    if cfg.colocate:
        return Placement(bounds, tuple(range(world)), tuple(range(world)))
    return Placement(bounds, tuple(range(servers)), tuple(range(servers, world)))


def _from_roles(cfg: TrainConfig, bounds: tuple, roles: list[str]) -> Placement:
    bad = [r for r, role in enumerate(roles) if role not in ROLES]
    if bad:
        raise ConfigError("DIST_QUANT_ROLE", f"must be one of {', '.join(ROLES)} on every rank; "
                          f"ranks {bad} have {[roles[r] for r in bad]}")
    if cfg.colocate:
        if set(roles) != {"colocated"}:
            raise ConfigError("DIST_QUANT_ROLE", "--colocate runs every rank as worker and "
                              "server: set it to colocated on every rank (or on none)")
        ranks = tuple(range(len(roles)))
        return Placement(bounds, ranks, ranks)
    servers = tuple(r for r, role in enumerate(roles) if role == "server")
    workers = tuple(r for r, role in enumerate(roles) if role == "worker")
    if len(servers) != cfg.num_shards or len(workers) != len(roles) - len(servers):
        raise ConfigError("DIST_QUANT_ROLE", f"--servers {cfg.servers} needs exactly "
                          f"{cfg.servers} server ranks and only workers besides; got "
                          f"{len(servers)} servers among roles {roles}")
    return Placement(bounds, servers, workers)


def _by_index(p: Placement, indices: list[int | None] | None) -> Placement:
    """``p`` with its workers ordered by ``DIST_QUANT_WORKER`` when every worker rank has one
    (colocated: the shards follow them, so worker I still serves shard I)."""
    if indices is None or any(indices[r] is None for r in p.worker_ranks):
        return p
    given = [indices[r] for r in p.worker_ranks]
    if sorted(given) != list(range(len(given))):
        raise ConfigError("DIST_QUANT_WORKER", f"the worker ranks must hold 0..{len(given) - 1}, "
                          f"each once; got {given}")
    workers = tuple(sorted(p.worker_ranks, key=lambda r: indices[r]))
    servers = workers if p.server_ranks == p.worker_ranks else p.server_ranks
    return Placement(p.bounds, servers, workers)
