"""The 1-bit colocated exchange as a DDP communication hook (public path).

The hook lives with the other baselines in :mod:`dist_quant.baselines.hooks`; this module is
where users import it from::

    from dist_quant.hooks import OneBitState, onebit_hook
    model.register_comm_hook(OneBitState(process_group=None), onebit_hook)
"""

from dist_quant.baselines.hooks import ALLGATHER_BITS, FLOAT_FORMATS, OneBitState, onebit_hook

__all__ = ["ALLGATHER_BITS", "FLOAT_FORMATS", "OneBitState", "onebit_hook"]
