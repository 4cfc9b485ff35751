"""Bring-your-own data: an ``.npz`` file holding ``x``, ``y``, ``x_test``, ``y_test``.

``x`` and ``x_test`` are ``[N, ...]`` numeric arrays (flattened to ``[N, D]``), ``y`` and
``y_test`` integer labels in ``0..K-1`` with ``K = max label + 1 <= MAX_CLASSES`` (a label far
above the others is a broken file, not a 100001-class problem). Every problem is reported
with the file and the key it concerns, as a :class:`ConfigError` of ``--dataset``: an empty
file, another format under the .npz name (a plain .npy, a text file), pickled object arrays,
missing keys, wrong shapes or dtypes, non-finite inputs, labels out of range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_quant.errors import ConfigError

KEYS = ("x", "y", "x_test", "y_test")
MAX_CLASSES = 1000


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    path = Path(path)

    def bad(msg: str) -> ConfigError:
        return ConfigError("--dataset", f"{path}: {msg}")

    if not path.is_file():
        raise bad("file not found")
    if path.stat().st_size == 0:
        raise bad("the file is empty (0 bytes)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same user error)
        raise bad(f"cannot read as .npz ({type(e).__name__}: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        kind = f"a single array {archive.shape}" if isinstance(archive, np.ndarray) else "data"
        raise bad(f"holds {kind} (an .npy file?), not an .npz archive of {', '.join(KEYS)}")
    with archive:
        missing = [k for k in KEYS if k not in archive.files]
        if missing:
            raise bad(f"missing key {missing[0]!r} (an .npz dataset needs {', '.join(KEYS)}; "
                      f"found {', '.join(archive.files) or 'nothing'})")
        arrays = {}
        for k in KEYS:
            try:
                arrays[k] = archive[k]
            except Exception as e:  # noqa: BLE001 (object arrays, truncated members)
                reason = "holds Python objects (object dtype), which are never unpickled" \
                    if "allow_pickle" in str(e) else f"cannot be read ({type(e).__name__}: {e})"
                raise bad(f"{k!r} {reason}") from e
    xs = {}
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        x, y = arrays[xk], arrays[yk]
        if x.ndim < 2 or x.shape[0] == 0:
            raise bad(f"{xk!r} must have shape [N, features...] with N > 0; got {x.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise bad(f"{xk!r} must be real numbers; got dtype {x.dtype}")
        if y.ndim != 1 or len(y) != len(x):
            raise bad(f"{yk!r} must have shape [{len(x)}] to match {xk!r}; got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise bad(f"{yk!r} must hold integer class labels; got dtype {y.dtype}")
        if y.min() < 0:
            raise bad(f"{yk!r} holds a negative label {int(y.min())}")
        if y.max() >= MAX_CLASSES:
            raise bad(f"{yk!r} holds label {int(y.max())}, which would make a "
                      f"{int(y.max()) + 1}-class model (at most {MAX_CLASSES} classes; labels "
                      "must be 0..K-1)")
        x = x.reshape(len(x), -1).astype(np.float64)
        if not np.isfinite(x).all():
            raise bad(f"{xk!r} holds {int((~np.isfinite(x)).sum())} non-finite value(s)")
        xs[xk] = x
    if arrays["y_test"].max() > arrays["y"].max():
        raise bad(f"'y_test' holds label {int(arrays['y_test'].max())}, above every label in 'y' "
                  f"(max {int(arrays['y'].max())})")
    if xs["x"].shape[1] != xs["x_test"].shape[1]:
        raise bad(f"'x' has {xs['x'].shape[1]} features per example but 'x_test' has "
                  f"{xs['x_test'].shape[1]}")
    return xs["x"], arrays["y"].astype(np.int64), xs["x_test"], arrays["y_test"].astype(np.int64)
