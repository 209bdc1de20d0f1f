"""Every model test runs its tiny torch models on one thread (the shared fixture in tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Applies :func:`tests.conftest.one_torch_thread` to each module of this folder."""
