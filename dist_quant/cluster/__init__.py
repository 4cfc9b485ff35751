"""Simulated clusters on one machine: hosts over shaped links, measured wire bytes.

An engine (:class:`~dist_quant.cluster.engine.Engine`) runs a training job with one torchrun
agent per host and writes ``link.json`` and ``wire.json`` beside the job's files; the commands
find engines by name in :mod:`dist_quant.cluster.registry`. Built in:

- ``netns``: ``run_cluster(cfg, rate_mbit, latency_ms, loss_pct=0.0)``, one network namespace
  per host (:mod:`dist_quant.cluster.run`; :mod:`dist_quant.cluster.netns` builds and removes
  the namespaces);
- ``compose``: ``run_compose`` (same arguments), the same hosts as containers of
  ``docker-compose.yml`` (:mod:`dist_quant.cluster.compose`).

The shaping and launch of each host live in ``launch/node.sh``, shared by both; the records
every engine writes and shows are :mod:`dist_quant.cluster.records`.
"""

from dist_quant.cluster.compose import run_compose
from dist_quant.cluster.engine import ClusterError, Engine
from dist_quant.cluster.netns import cleanup_stale
from dist_quant.cluster.registry import get_engine, register
from dist_quant.cluster.run import run_cluster

__all__ = ["ClusterError", "Engine", "cleanup_stale", "get_engine", "register", "run_cluster",
           "run_compose"]
