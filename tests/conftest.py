"""Shared test fixtures and the ``cuda`` marker.

Every test that needs a CUDA device carries the ``cuda`` marker (the ``device`` fixture's cuda
case included), so ``pytest -m cuda`` selects exactly the CUDA tests and ``-m "not cuda"`` the
others. Without a device they are skipped. The marker is looked up with ``get_closest_marker``,
not in ``item.keywords``: keywords also hold the names of the test's folders and functions
(a checkout under ``.../cuda/`` or a test named ``..._cuda_graph_...``).
"""

import pytest
import torch

import jem_ext  # noqa: F401  (registers torch.ops.jem_ext)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
