"""Fixtures of the live-driver tests (helpers are in live_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def demo_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DLORA_HOME in a temp folder shared by the session (the demo is written once)."""
    home = tmp_path_factory.getbasetemp() / "dlora-home"
    monkeypatch.setenv("DLORA_HOME", str(home))
    return home
