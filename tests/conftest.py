import pytest
import torch

from lifelong_engine import backends


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def backend_registry():
    """Snapshot of the backend registry, restored after the test (for tests that register fakes)."""
    registry, missing = dict(backends._registry), dict(backends._missing)
    yield backends
    backends._registry.clear()
    backends._registry.update(registry)
    backends._missing.clear()
    backends._missing.update(missing)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
