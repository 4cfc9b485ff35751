"""Datasets, shards and the per-worker batch order."""

from __future__ import annotations

import gzip
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_quant.data import Dataset, load_dataset, worker_batches
from dist_quant.data.idx import read_idx, write_idx
from dist_quant.data.mnist1d import (
    FINAL_LENGTH,
    gaussian_filter1d,
    make_mnist1d,
    resample,
    templates,
)
from dist_quant.errors import ConfigError

torch.set_num_threads(1)


def cfg(**kw):
    base = {"dataset": "mnist1d", "data_dir": "", "train_size": 4000, "test_size": 1000,
            "seed": 0}
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def mnist1d() -> Dataset:
    return load_dataset(cfg())


# --- MNIST-1D generation -------------------------------------------------------------------

def test_templates_are_whitened_and_start_at_zero():
    t = templates()
    assert t.shape == (10, 12)
    np.testing.assert_allclose(t[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(t.std(axis=1), 1 / 6, rtol=1e-12)


def test_resample_is_np_interp_row_by_row():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 72))
    lengths = np.array([2, 13, 48, 60, 71, 72])
    out = resample(x, lengths, 40)
    for i, n in enumerate(lengths):
        ref = np.interp(np.linspace(0, 1, 40), np.linspace(0, 1, n), x[i, :n])
        np.testing.assert_allclose(out[i], ref, rtol=0, atol=1e-12)


def test_gaussian_filter_keeps_constants_and_spreads_an_impulse_as_the_kernel():
    np.testing.assert_allclose(gaussian_filter1d(np.full((2, 30), 3.0), 2.0), 3.0, atol=1e-12)
    impulse = np.zeros((1, 41))
    impulse[0, 20] = 1.0
    out = gaussian_filter1d(impulse, 2.0)[0]
    t = np.arange(-8, 9)
    kernel = np.exp(-t**2 / 8) / np.exp(-t**2 / 8).sum()
    np.testing.assert_allclose(out[12:29], kernel, atol=1e-15)
    assert out[:12].sum() == 0 and out[29:].sum() == 0


def test_mnist1d_is_deterministic_and_independent_of_the_training_seed():
    a = make_mnist1d(200, 50)
    b = make_mnist1d(200, 50)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    other = make_mnist1d(200, 50, seed=7)
    assert not np.allclose(a[0], other[0])
    d0, d1 = load_dataset(cfg(seed=0, train_size=200, test_size=50)), load_dataset(
        cfg(seed=123, train_size=200, test_size=50))
    assert torch.equal(d0.x_train, d1.x_train) and torch.equal(d0.y_test, d1.y_test)


def test_mnist1d_shapes_types_and_standardisation(mnist1d):
    ds = mnist1d
    assert ds.name == "mnist1d" and ds.num_classes == 10 and ds.in_features == FINAL_LENGTH
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(40), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.x_train.std(0, correction=0), torch.ones(40), atol=1e-4, rtol=0)
    assert torch.isfinite(ds.x_test).all()


def test_mnist1d_classes_are_exactly_balanced(mnist1d):
    assert torch.bincount(mnist1d.y_train).tolist() == [400] * 10
    assert torch.bincount(mnist1d.y_test).tolist() == [100] * 10


def test_mnist1d_is_learnable_far_above_chance(mnist1d):
    """A small MLP, 300 Adam steps: chance is 10% (std 1% on 1000 test examples); the paper's
    fully trained MLP gets 68%. 40% is 30 standard deviations above chance."""
    ds = mnist1d
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2 / p.shape[-1]) ** 0.5 * (p.dim() > 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        idx = torch.randint(0, len(ds.y_train), (100,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert acc > 0.40, acc


# --- teacher task --------------------------------------------------------------------------

def test_teacher_is_deterministic_and_roughly_balanced():
    a, b = load_dataset(cfg(dataset="teacher")), load_dataset(cfg(dataset="teacher", seed=5))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape == (4000, 40) and a.num_classes == 10
    freq = torch.bincount(a.y_train, minlength=10).float() / 4000
    assert freq.min() > 0.05 and freq.max() < 0.2, freq


# --- shards and batches --------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 3, 4, 7])
def test_shards_are_disjoint_cover_everything_and_are_deterministic(mnist1d, workers):
    ds = mnist1d
    rows = {tuple(r.tolist()): i for i, r in enumerate(ds.x_train)}
    seen = []
    for r in range(workers):
        s = ds.shard(r, workers)
        assert torch.equal(s.x_train, ds.shard(r, workers).x_train)
        assert torch.equal(s.x_test, ds.x_test)
        assert abs(len(s.y_train) - len(ds.y_train) / workers) < 1
        for x, y in zip(s.x_train, s.y_train, strict=True):
            i = rows[tuple(x.tolist())]
            assert ds.y_train[i] == y
            seen.append(i)
    assert sorted(seen) == list(range(len(ds.y_train)))


def test_shard_rejects_bad_indices(mnist1d):
    with pytest.raises(ValueError, match="worker index 4"):
        mnist1d.shard(4, 4)
    with pytest.raises(ConfigError, match="--workers"):
        mnist1d.shard(0, 0)


def test_each_epoch_is_a_fresh_permutation_owned_by_the_worker():
    s = worker_batches(10, 3, seed=0, worker_index=1)
    epochs = [torch.cat([s.next() for _ in range(3)]) for _ in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == 9 and e.dtype == torch.int64
    assert not torch.equal(epochs[0], epochs[1])
    assert s.state_dict() == {"epoch": 2, "position": 9}
    other = worker_batches(10, 3, seed=0, worker_index=2)
    assert not torch.equal(torch.cat([other.next() for _ in range(3)]), epochs[0])
    state = torch.get_rng_state()
    worker_batches(10, 3, seed=0, worker_index=1).next()
    assert torch.equal(state, torch.get_rng_state())


def test_sampler_resume_equals_uninterrupted():
    full = worker_batches(50, 8, seed=3, worker_index=0)
    reference = [full.next() for _ in range(40)]
    first = worker_batches(50, 8, seed=3, worker_index=0)
    for _ in range(17):
        first.next()
    state = first.state_dict()
    resumed = worker_batches(50, 8, seed=3, worker_index=0)
    resumed.load_state_dict(state)
    for expected in reference[17:]:
        assert torch.equal(resumed.next(), expected)


def test_sampler_rejects_a_batch_larger_than_the_shard():
    with pytest.raises(ConfigError, match="--batch-size"):
        worker_batches(10, 11, seed=0, worker_index=0)


# --- MNIST IDX files -----------------------------------------------------------------------

def write_mnist(tmp_path, n_train=30, n_test=12, gz=False):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_through_load_dataset(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    images, labels = arrays["t10k"]
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", 3),
                                  images)
    ds = load_dataset(cfg(dataset="mnist", data_dir=str(tmp_path)))
    assert ds.x_train.shape == (30, 784) and ds.x_test.shape == (12, 784)
    assert ds.num_classes == 10 and ds.y_test.tolist() == labels.tolist()
    assert sorted(ds.y_train.tolist()) == sorted(arrays["train"][1].tolist())
    # standardisation is increasing per feature: the test images keep their pixel order
    flat = images.reshape(12, -1).astype(np.float64)
    assert (np.argsort(flat[:, 100], kind="stable")
            == np.argsort(ds.x_test[:, 100].numpy(), kind="stable")).all()


def test_malformed_idx_files_are_rejected_naming_the_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = path.read_bytes()
    path.write_bytes(b"\x00\x00\x0d\x01" + raw[4:])  # float type instead of ubyte
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte: bad magic number"):
        load_dataset(cfg(dataset="mnist", data_dir=str(tmp_path)))
    path.write_bytes(raw[:-1])
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte: header says shape"):
        load_dataset(cfg(dataset="mnist", data_dir=str(tmp_path)))
    write_idx(path, np.zeros(29, dtype=np.uint8))
    with pytest.raises(ConfigError, match="30 images but .* 29 labels"):
        load_dataset(cfg(dataset="mnist", data_dir=str(tmp_path)))
    write_idx(path, np.full(30, 10, dtype=np.uint8))
    with pytest.raises(ConfigError, match="label 10 is not a digit"):
        load_dataset(cfg(dataset="mnist", data_dir=str(tmp_path)))
    path.unlink()
    with pytest.raises(ConfigError, match="--data-dir: .*train-labels-idx1-ubyte.gz found"):
        load_dataset(cfg(dataset="mnist", data_dir=str(tmp_path)))


def test_truncated_gzip_idx_is_rejected(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(path.read_bytes())[:40])
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset(cfg(dataset="mnist", data_dir=str(tmp_path)))


# --- .npz files ----------------------------------------------------------------------------

def npz_arrays():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((20, 3, 2)), "y": np.arange(20) % 4,
            "x_test": rng.standard_normal((8, 3, 2)), "y_test": np.arange(8) % 4}


def test_npz_loads_flattened_with_classes_from_labels(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, **npz_arrays())
    ds = load_dataset(cfg(dataset=str(path)))
    assert ds.x_train.shape == (20, 6) and ds.in_features == 6 and ds.num_classes == 4
    assert ds.y_test.tolist() == (np.arange(8) % 4).tolist()


@pytest.mark.parametrize(("change", "message"), [
    ({"drop": "x_test"}, "missing key 'x_test'"),
    ({"y": np.arange(19) % 4}, "'y' must have shape \\[20\\]"),
    ({"y": np.linspace(0, 3, 20)}, "'y' must hold integer class labels"),
    ({"y_test": np.full(8, -1)}, "'y_test' holds a negative label -1"),
    ({"y_test": np.full(8, 9)}, "'y_test' holds label 9, above every label in 'y'"),
    ({"x_test": np.zeros((8, 5))}, "'x' has 6 features per example but 'x_test' has 5"),
    ({"x": np.full((20, 6), np.nan)}, "'x' holds 120 non-finite"),
    ({"x": np.zeros(20)}, "'x' must have shape \\[N, features...\\]"),
])
def test_npz_errors_name_the_file_and_key(tmp_path, change, message):
    arrays = npz_arrays()
    arrays.pop(change.pop("drop", None), None)
    arrays.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match="--dataset: .*bad.npz: " + message):
        load_dataset(cfg(dataset=str(path)))


def test_unknown_dataset_names_the_option():
    with pytest.raises(ConfigError, match="--dataset"):
        load_dataset(cfg(dataset="cifar"))
