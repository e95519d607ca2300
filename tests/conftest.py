"""Shared fixtures: real SQLite files in tmp_path, settings pointing at them."""

from __future__ import annotations

import os

import pytest

from datasource.config import Settings
from datasource.db import open_database


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No test reads the developer's CPA_MONITOR_* variables or data directory."""
    for name in list(os.environ):
        if name.startswith("CPA_MONITOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "monitor.db")


@pytest.fixture
def settings(db_path: str) -> Settings:
    return Settings.from_env({}, db=db_path, collector="off")


@pytest.fixture
def conn(db_path: str):
    connection = open_database(db_path)
    yield connection
    connection.close()
