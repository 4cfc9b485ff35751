"""Simulated clusters on one machine: network namespaces, shaped links, measured wire bytes.

``run_cluster(cfg, rate_mbit, latency_ms, loss_pct=0.0)`` runs a training job with one
torchrun agent per namespace host (see :mod:`dist_quant.cluster.run`);
:mod:`dist_quant.cluster.netns` builds and removes the namespaces; the shaping and launch of
each host live in ``launch/node.sh``, shared with the Docker entrypoint.
``run_compose`` (same arguments) runs the same hosts as containers of ``docker-compose.yml``
(:mod:`dist_quant.cluster.compose`).
"""

from dist_quant.cluster.compose import run_compose
from dist_quant.cluster.netns import ClusterError, cleanup_stale
from dist_quant.cluster.run import run_cluster

__all__ = ["ClusterError", "cleanup_stale", "run_cluster", "run_compose"]
