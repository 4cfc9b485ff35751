"""Reading runs back: the link model that re-times a recorded run and ``dist-quant predict``."""
