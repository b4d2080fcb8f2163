"""Fixtures of the executor tests: the demo folder, an executor, a driver (helpers are in
exec_helpers.py)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from exec_helpers import Driver

from dlora.exec import TorchExecutor, demo_adapter_paths, write_demo


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="session")
def adapter_paths(demo_dir: Path) -> dict[int, Path]:
    return demo_adapter_paths(demo_dir)


@pytest.fixture()
def executor(demo_dir: Path, adapter_paths: dict[int, Path]) -> TorchExecutor:
    return TorchExecutor(demo_dir, adapter_paths, block_size=4, num_kv_blocks=256)


@pytest.fixture()
def drive() -> Callable[..., Driver]:
    return Driver
