"""``python -m dist_quant.localrun``: torchrun for one machine, every socket on loopback.

The command users run; the launcher itself is :mod:`dist_quant.runner.localrun`::

    python -m dist_quant.localrun --nproc-per-node 5 -m dist_quant.train --workers 4
"""

from dist_quant.runner.localrun import main

if __name__ == "__main__":
    main()
