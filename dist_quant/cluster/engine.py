"""The seam between the cluster commands and the ways of running hosts: :class:`Engine`.

An engine runs one training job on simulated hosts, one torchrun agent per host, over links
shaped to a rate, latency and loss, and leaves the same records as every other engine.
``dist-quant cluster`` and ``dist-quant sweep`` know engines only through this interface and
the registry (:mod:`dist_quant.cluster.registry`); the built-in ones are ``netns`` (network
namespaces, :mod:`dist_quant.cluster.run`) and ``compose`` (containers,
:mod:`dist_quant.cluster.compose`). A new engine is a subclass in its own module and one
``register`` line.

The order in which ``dist-quant cluster`` calls an engine:

1. ``needs_root``: checked before the options are read (a user without root hears that first);
2. :meth:`Engine.check`, once the options are read and before they are checked against the
   data and the run directory: can this machine run the engine now;
3. :meth:`Engine.check_links` with the ``--worker-rate`` caps (``dist-quant sweep`` calls it
   while it reads its options, before any point runs);
4. :meth:`Engine.run`, through :func:`dist_quant.cluster.dilation.run_dilated`, which
   scales the link and the timeout by ``--dilate`` and rewrites the records in dilated time:
   the engine itself is given the scaled link and the factor (``dilate``) only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from dist_quant.config import TrainConfig
from dist_quant.errors import ClusterError, ConfigError  # noqa: F401 (re-exported)


class Engine(ABC):
    """One way of running a job's hosts over shaped links.

    Class attributes:

    - ``name``: the value of ``--engine``, and the ``engine`` a sweep point records;
    - ``mark``: the part of a sweep point's name that says the point ran on this engine (the
      default engine's points carry it only when uncapped, as forced onto the cluster);
    - ``help``: how it places hosts, for ``dist-quant cluster --help``
      (``NAME: HELP``);
    - ``summary``: the same for ``dist-quant sweep --help`` (a plural noun phrase);
    - ``needs_root``: the engine cannot run without root (asked before the options are read).
    """

    name: str = ""
    mark: str = ""
    help: str = ""
    summary: str = ""
    needs_root: bool = False

    def check(self) -> None:
        """Raise :class:`ClusterError` with one line naming what is missing unless this
        machine can run the engine now. Nothing is started or written."""
        return  # by default: nothing to check

    def check_links(self, worker_rates: Mapping[int, float]) -> None:
        """Raise :class:`~dist_quant.errors.ConfigError` naming the option for link settings
        this engine cannot make; ``worker_rates``: ``{I: Mbit/s}`` of ``--worker-rate``."""
        return  # by default: every link setting is made

    @abstractmethod
    def run(self, cfg: TrainConfig, rate_mbit: float | None, latency_ms: float,
            loss_pct: float = 0.0, *, mtu: int = 1500,
            worker_rates: Mapping[int, float] | None = None,
            dilate: float = 1.0) -> dict[str, Any]:
        """Run ``cfg`` (a distributed job, not ``--simulate``) on this engine's hosts.

        ``rate_mbit`` None or 0 = uncapped, ``latency_ms`` one way host to host, ``loss_pct``
        on each host-to-host path, ``mtu`` of every link, ``worker_rates`` ``{I: Mbit/s}``
        worker I's own cap (refused as :meth:`check_links` refuses it). The hosts are
        removed however the job ends (success, failure, Ctrl-C, SIGTERM).

        ``dilate`` (:mod:`dist_quant.cluster.dilation`): the rates and latency given are
        already the dilated ones; the engine sizes each rate limiter's burst for the rate x
        ``dilate`` (``launch/node.sh``'s ``DQ_DILATE``) and draws its progress bar in
        dilated time. An engine whose ``run`` takes no ``dilate`` runs undilated only.

        Returns ``{"run_dir", "link", "wire", "seconds"}`` after writing the training job's
        files, ``link.json`` (``link``) and ``wire.json`` (``wire``: at least the fields of
        :func:`dist_quant.cluster.records.wire_record`) into the run directory
        (``cfg.run_dir``, or a new one under ``runs/``). Raises
        :class:`~dist_quant.errors.ConfigError` for an option the engine refuses and
        :class:`ClusterError` (with ``exit_code`` 2 for a bad option found by a host) when
        the job fails.
        """


def parse_worker_rates(items: list[str] | tuple[str, ...], workers: int) -> dict[int, float]:
    """``["I=MBIT", ...]`` (or one ``"I=MBIT,J=MBIT"``) as ``{I: Mbit/s}``; ConfigError naming
    ``--worker-rate`` for a malformed item, an unknown worker or a rate that is not > 0."""
    out: dict[int, float] = {}
    for item in (t.strip() for text in items for t in text.split(",")):
        if not item:
            continue
        worker, sep, rate = item.partition("=")
        try:
            i, mbit = int(worker), float(rate)
        except ValueError:
            i, mbit = -1, float("nan")
        if not sep or i in out or not (i >= 0 and mbit > 0):
            raise ConfigError("--worker-rate", f"expected I=MBIT (worker I, 0-based, at MBIT > 0 "
                              f"Mbit/s), each worker once; got {item!r}")
        if i >= workers:
            raise ConfigError("--worker-rate", f"worker {i} does not exist: workers are "
                              f"0..{workers - 1}")
        out[i] = mbit
    return out
