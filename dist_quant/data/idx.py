"""MNIST's IDX files: read (plain or ``.gz``), validated, and written (for tests and tools).

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>`` followed by ``ndim``
big-endian uint32 sizes and the data, row-major. MNIST uses type ``0x08`` (unsigned byte):
images ``[N, 28, 28]`` (magic 2051) and labels ``[N]`` (magic 2049).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from dist_quant.errors import ConfigError

UBYTE = 0x08
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path, ndim: int, option: str = "--data-dir") -> np.ndarray:
    """Read an unsigned-byte IDX file with ``ndim`` dimensions; errors name the file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise ConfigError(option, f"{path}: cannot read IDX file ({e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(option, f"{path}: {len(raw)} bytes is shorter than the IDX header "
                          f"({header} bytes)")
    zero, dtype, got_ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != UBYTE or got_ndim != ndim:
        magic = struct.unpack(">I", raw[:4])[0]
        raise ConfigError(option, f"{path}: bad magic number {magic} (0x{magic:08x}); expected "
                          f"{(UBYTE << 8) | ndim} for unsigned-byte data with {ndim} dimension(s)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ConfigError(option, f"{path}: header says shape {shape} ({expected} bytes) but the "
                          f"file holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip-compressed when the name ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(raw)


def find_file(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise ConfigError("--data-dir", f"{directory}: neither {name} nor {name}.gz found")


def load_mnist(directory: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [N, 784] in [0, 1], y_train, x_test, y_test) from the four MNIST IDX files."""
    directory = Path(directory)
    out = []
    for split in ("train", "test"):
        img_name, lbl_name = MNIST_FILES[split]
        img_path, lbl_path = find_file(directory, img_name), find_file(directory, lbl_name)
        images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
        if images.shape[0] != labels.shape[0]:
            raise ConfigError("--data-dir", f"{img_path} holds {images.shape[0]} images but "
                              f"{lbl_path} holds {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise ConfigError("--data-dir", f"{lbl_path}: label {int(labels.max())} is not a "
                              "digit 0..9")
        out += [images.reshape(len(images), -1).astype(np.float64) / 255.0,
                labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]
