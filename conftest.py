"""The names that the docstring examples of `src/bitune` use (pytest runs them with --doctest-modules).

`tokenizer` and `base` are the real llama2.c stories260K model (a 0.26M-parameter Llama trained on
TinyStories, from ../shared/data), `model` a fresh `BituneModel` on it, `checkpoint` that model saved,
`tmp` a fresh empty temporary folder (a `Path`) for each example that writes files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def _doctest_objects(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from bitune import BituneModel
    from bitune.core.convert import convert_llama2c
    from bitune.core.loading import load_tokenizer

    if not SHARED_DATA.is_dir():
        pytest.skip(f"the examples read {SHARED_DATA}, which is absent")
    folder = tmp_path_factory.mktemp("doctest")
    models = SHARED_DATA / "models"
    base = convert_llama2c(models / "stories260K.bin", models / "tok512.bin", folder / "stories260k")
    torch.manual_seed(0)
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear")
    ).eval()
    tokenizer = load_tokenizer(base)
    model.save_pretrained(folder / "checkpoint", tokenizer=tokenizer)
    return {"base": base, "model": model, "tokenizer": tokenizer, "checkpoint": folder / "checkpoint"}


@pytest.fixture(autouse=True)
def _doctest_names(request: pytest.FixtureRequest) -> Iterator[None]:
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    import torch

    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(request.getfixturevalue("_doctest_objects"))
    namespace["tmp"] = request.getfixturevalue("tmp_path")
    # The examples' models are tiny: one thread is faster than several, and steady on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
