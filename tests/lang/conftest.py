"""Every kernel-language test runs twice: instances batched per PE (``auto``) and one by one (``off``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, params=["auto", "off"], ids=["batch-auto", "batch-off"])
def batch_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default batch mode of every launch in the test (``KBUS_LANG_BATCH``)."""
    mode: str = request.param
    monkeypatch.setenv("KBUS_LANG_BATCH", mode)
    return mode
