"""Shared pytest fixtures."""

from pathlib import Path

import pytest
import torch

from bitune.convert import convert_llama2c

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
