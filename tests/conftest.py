"""Shared test fixtures: the devices to run op tests on (CUDA only when present)."""

import pytest
import torch

import jem_ext  # noqa: F401  (registers torch.ops.jem_ext)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
