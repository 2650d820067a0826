"""Fixtures of the evaluation tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def lm_eval_task_manager(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[Path], object]:
    """Build lm-eval TaskManagers over a folder of task YAMLs, offline, with the datasets cache in tmp_path."""
    datasets = pytest.importorskip("datasets")
    tasks = pytest.importorskip("lm_eval.tasks")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    return lambda folder: tasks.TaskManager(include_path=str(folder), include_defaults=False)
