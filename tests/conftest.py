"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a shared 2-core machine (10x slower).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def drop_cache():
    """Make a model lose its cache between decoding steps, as the hybrid did under transformers 5.24 (the cache
    came under a name its forward did not read): every step then starts from an empty cache."""
    from harness.models.cache_args import CACHE_NAMES

    def drop(model):
        forward = model.forward
        model.forward = lambda *a, **kw: forward(*a, **{k: v for k, v in kw.items() if k not in CACHE_NAMES})
        return model

    return drop
