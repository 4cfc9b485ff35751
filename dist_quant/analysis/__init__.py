"""Reading runs back: the link model that re-times a recorded run (``dist-quant predict``),
the re-timing of recorded synchronous runs on the modelled clock for other links and host
speeds (``dist-quant retime``), and its break-even links and heat maps.
"""
