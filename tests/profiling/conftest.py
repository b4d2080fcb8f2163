"""Fixtures of the profiling tests: the demo model folder (written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dlora.exec import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"), seed=0)
