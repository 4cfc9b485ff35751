"""Test-wide settings: one torch thread per process (several processes share 2 cores), and a
check after every module that it left no process, namespace, interface, container or docker
network of the project behind (tests/leftovers.py)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from leftovers import left_behind, snapshot  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def leaves_nothing_behind(request):
    before = snapshot()
    yield
    left = left_behind(before)
    if left:
        pytest.fail(f"{request.module.__name__} left behind:\n  " + "\n  ".join(left),
                    pytrace=False)
