"""Datasets (generated MNIST-1D, a teacher task, MNIST IDX files, any .npz) and the per-worker
minibatch order. See :mod:`dist_quant.data.dataset` and :mod:`dist_quant.data.sampler`."""

from dist_quant.data.dataset import Dataset, load_dataset
from dist_quant.data.sampler import BatchSampler, worker_batches

__all__ = ["BatchSampler", "Dataset", "load_dataset", "worker_batches"]
