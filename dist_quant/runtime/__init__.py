"""What runs inside a rank's process and what it leaves behind: the device and process group
(:mod:`~dist_quant.runtime.rank`), metrics, checkpoints, disk faults, divergence, the progress
bar and TensorBoard files. Imports only the core layer, the compressors, the data and the config;
the roles above use it.
"""
