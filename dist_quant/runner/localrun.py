"""torchrun for one machine, listening on loopback only: ``python -m dist_quant.localrun``.

::

    python -m dist_quant.localrun --nproc-per-node 5 -m dist_quant.train --workers 4
    python -m dist_quant.localrun --nproc-per-node 5 examples/cnn_shapes.py

It takes torchrun's arguments (``--standalone`` is implied and may be left out) and runs
torchrun's own ``main`` in this process, with three changes:

- **every store listens on 127.0.0.1.** torch.distributed's ``TCPStore`` server binds to every
  interface whatever host it is given; torchrun's agent starts two (the c10d rendezvous store
  and the store the ranks start from, ``MASTER_PORT``), and neither authenticates a client.
  Here each server store gets a socket already bound to ``127.0.0.1`` (``master_listen_fd``;
  port 0 = a free port), and the rendezvous is a c10d endpoint on ``127.0.0.1:0`` hosted by
  this process with the ranks' ``MASTER_ADDR`` = ``127.0.0.1``: what ``--standalone`` starts,
  minus the other interfaces. Restarts (``--max-restarts``) keep the same stores, as torchrun's
  own do;
- **gloo's sockets are on the loopback interface** (``GLOO_SOCKET_IFNAME=lo`` unless set: by
  default gloo binds to the address the machine's hostname resolves to, which may be a
  network interface);
- **it ends with its parent.** ``DIST_QUANT_PARENT=<pid>`` (set by
  :func:`dist_quant.runner.launcher.run_torchrun`) asks for SIGTERM when that process dies by any
  signal, SIGKILL included (Linux ``PR_SET_PDEATHSIG``); torchrun then stops its ranks as on
  any SIGTERM, and the ranks themselves die with torchrun
  (:func:`dist_quant.runner.launcher.die_with_parent`). With ``DIST_QUANT_RUN_DIR`` set, the run
  directory then gets ``stopped.json`` (``"stopped_by": "launcher died"``), written here
  because the launcher no longer can.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import uuid
from pathlib import Path

from dist_quant.runner.launcher import write_stopped

LOOPBACK = "127.0.0.1"
LOOPBACK_IFNAME = "lo"
# torchrun's options (argparse dests) that this module sets
OWN = ("nnodes", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf", "local_addr",
       "master_addr", "master_port", "node_rank")


def bind_servers_to(address: str) -> None:
    """Make every ``TCPStore`` server started in this process listen on ``address`` only."""
    import torch.distributed as dist
    from torch.distributed import rendezvous
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    base = dist.TCPStore
    if getattr(base, "bound_to", None) is not None:
        return
    names = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers",
             "multi_tenant", "master_listen_fd", "use_libuv")

    class BoundTCPStore(base):
        bound_to = address

        def __init__(self, *args, **kwargs):
            kwargs.update(zip(names[:len(args)], args, strict=True))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                self._listener = socket.socket(family, socket.SOCK_STREAM)
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._listener.bind((address, int(kwargs.get("port") or 0)))
                kwargs["port"] = self._listener.getsockname()[1]
                kwargs["master_listen_fd"] = self._listener.fileno()
            super().__init__(**kwargs)

    dist.TCPStore = BoundTCPStore
    c10d_rendezvous_backend.TCPStore = BoundTCPStore
    rendezvous.TCPStore = BoundTCPStore


def die_with(parent: int) -> None:
    """SIGTERM to this process when ``parent`` dies (Linux); exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(128 + signal.SIGTERM)


def torchrun_argv(argv: list[str]) -> list[str]:
    """torchrun's arguments for ``argv``: a one-node c10d rendezvous on loopback first.
    SystemExit (one line, exit 2) when ``argv`` sets the rendezvous or the nodes itself."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    given = parser.parse_args(argv)
    script = len(argv) - len(given.training_script_args) - 1   # torchrun's options before it
    argv = [a for a in argv[:script] if a != "--standalone"] + argv[script:]
    for action in parser._actions:
        if action.dest in OWN and getattr(given, action.dest) != action.default:
            sys.stderr.write(f"Error: {action.option_strings[0]}: dist_quant.localrun runs "
                             "one node on loopback; run torchrun itself for a multi-machine "
                             "job\n")
            raise SystemExit(2)
    return ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{LOOPBACK}:0",
            "--rdzv-id", uuid.uuid4().hex, "--rdzv-conf", "is_host=1",
            "--local-addr", LOOPBACK, *argv]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parent = int(os.environ.pop("DIST_QUANT_PARENT", "0") or 0)
    run_dir = os.environ.pop("DIST_QUANT_RUN_DIR", "")
    if parent:
        die_with(parent)
    args = torchrun_argv(argv)
    if LOOPBACK_IFNAME in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_IFNAME)
    bind_servers_to(LOOPBACK)
    from torch.distributed.run import main as torchrun_main

    sys.argv = ["torchrun", *args]
    try:
        torchrun_main(args)
    finally:
        if parent and os.getppid() != parent:   # the launcher died: nobody else can say so

            if run_dir:
                write_stopped(Path(run_dir), "launcher died", launcher_pid=parent)
            os._exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
