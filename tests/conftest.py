"""Shared test setup: tests marked `gpu` skip without CUDA."""

import pytest
import torch



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# bitsandbytes logs a failed optional import (the `kernels` package) the first time it is imported; when that
# happens inside a model load, the log record's traceback keeps the loading frame -- and its model -- alive.
# Importing it here, before any test builds a model, makes that record hold nothing.
try:
    import bitsandbytes  # noqa: F401
except ImportError:
    pass


@pytest.fixture
def live_bytes():
    """A function: the tensor bytes alive in this process now (what earlier tests left counts as well).

    Memory assertions made with the tracker or a budget are about a *rise*: subtract this baseline.
    """
    import gc

    from memopt_lib.profiler import MemoryTracker

    def now() -> int:
        gc.collect()
        with MemoryTracker("cpu", timeline=False) as t:
            pass
        return t.result().start_bytes
    return now
