"""What a run keeps and shows while it runs: metrics, checkpoints, disk faults, divergence,
the progress bar and TensorBoard files. Used by the roles below the launcher; imports only the
core layer, the compressors, the data and the config.
"""
