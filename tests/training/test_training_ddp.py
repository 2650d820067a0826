"""Data-parallel training on CPU: 2 processes under torchrun (gloo) match 1 process with the same global batch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import torchrun
from training.test_training import assert_same_weights, base, run, settings, training_logs  # noqa: F401 (base: fixture)


def train_with_torchrun(config: dict, folder: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`bitune train` in CPU processes, launched as users launch it."""
    path = folder / f"{Path(config['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return torchrun("-m", "bitune", "train", str(path), processes=processes)


def test_two_processes_train_like_one_with_the_same_global_batch(base, tmp_path):  # noqa: F811
    schedule = {"max_steps": 3, "save_steps": 3}
    single = run(base, tmp_path / "single", training={**schedule, "batch_size": 4})
    process = train_with_torchrun(
        settings(base, tmp_path / "ddp", training={**schedule, "batch_size": 2}), tmp_path
    )
    assert process.returncode == 0, process.stderr[-3000:]

    single_logs, ddp_logs = training_logs(tmp_path / "single"), training_logs(tmp_path / "ddp")
    assert [record["step"] for record in ddp_logs] == [1, 2, 3]
    # The loss is the mean over the global batch's answer tokens: not summed or scaled by the 2 processes.
    assert [record["loss"] for record in ddp_logs] == pytest.approx(
        [r["loss"] for r in single_logs], abs=1e-4
    )
    assert [record["grad_norm"] for record in ddp_logs] == pytest.approx(
        [r["grad_norm"] for r in single_logs], abs=1e-4
    )
    assert_same_weights(single, tmp_path / "ddp" / "final", atol=1e-5)
    checkpoint = tmp_path / "ddp" / "checkpoint-3"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()


@pytest.mark.slow  # a second launch; test_training.py checks the same refusals without one
def test_fsdp_is_refused_at_start_up(base, tmp_path):  # noqa: F811
    config = settings(base, tmp_path / "fsdp", training={"trainer_args": {"fsdp": True}})
    process = train_with_torchrun(config, tmp_path, processes=1)  # one process is enough to be "distributed"
    assert "exitcode  : 2" in process.stderr  # the CLI's exit code for a bad setting, not a crash
    assert "bitune train: error: FSDP through the Trainer is not supported yet" in process.stderr
    assert not (tmp_path / "fsdp" / "metrics.jsonl").exists()
