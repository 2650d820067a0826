"""Resuming and the output folder: a resumed run ends exactly as an uninterrupted one (from any checkpoint, the
last included, and after kill -9 at random times, during saves too); a resume that would change what defines the
run is refused, naming each difference, unless forced; one run at a time per output folder; what interrupted
saves leave behind is removed; the start of a run says what it will do, on a device it can do it on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bitune import BituneModel
from bitune.cli import main
from bitune.training.outputs import LOCK_FILE, RUN_FILE
from training.test_training import assert_same_weights, make_base, metrics, run, settings, training_logs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


def cli_train(tmp_path: Path, raw: dict, *overrides: str) -> int:
    """`bitune train` of the plain-data config `raw` (written to a file beside its output folder)."""
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return main(["train", str(path), *overrides])


# ----------------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_from_the_last_checkpoint_trains_no_further(base, tmp_path):
    schedule = {"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant"}
    final = run(base, tmp_path, training=schedule)
    shutil.rmtree(final)  # as if the run had been killed while it wrote its final model
    again = run(base, tmp_path, training={**schedule, "resume_from_checkpoint": "latest"})
    assert_same_weights(tmp_path / "checkpoint-4", again, atol=0)
    assert max(record["step"] for record in metrics(tmp_path)) == 4  # no fifth step

    # And from the last checkpoint named by its path, in another folder.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "checkpoint-4", copy / "checkpoint-4")
    resumed = run(base, copy, training={**schedule, "resume_from_checkpoint": str(copy / "checkpoint-4")})
    assert_same_weights(tmp_path / "checkpoint-4", resumed, atol=0)


def test_resume_from_an_earlier_checkpoint_is_bit_identical(base, tmp_path):
    schedule = {"max_steps": 4, "save_steps": 2}
    reference = run(base, tmp_path / "reference", training=schedule)
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    for name in ("checkpoint-4", "final"):
        shutil.rmtree(tmp_path / "resumed" / name)
    resumed = run(base, tmp_path / "resumed", training={**schedule, "resume_from_checkpoint": "latest"})
    assert_same_weights(reference, resumed, atol=0)
    assert training_logs(tmp_path / "resumed") == training_logs(tmp_path / "reference")


KILLER = """
import contextlib, io, json, os, random, signal, sys, time, traceback
from pathlib import Path

import torch

torch.set_num_threads(1)
from bitune.cli import main
from bitune.training import TrainConfig, train

settings, reference, kills_wanted, seed = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
output, rng = Path(settings["output_dir"]), random.Random(seed)


def start(config):  # a forked child trains: the parent imported torch and bitune once for all of them
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            train(TrainConfig.from_dict(config))
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    return pid


def exit_code(pid, block=False):
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def wait(pid, seconds, until=lambda: False):
    deadline = time.time() + seconds
    while time.time() < deadline and not until():
        if (code := exit_code(pid)) is not None:
            return code
        time.sleep(0.0005)
    return None


def leftovers():
    return sorted(p.name for p in output.glob(".*") if p.name.startswith((".tmp-", ".old-")))


def published():
    steps = [int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(steps, default=0)


def saving():  # a checkpoint newer than the newest complete one is being written
    newest = published()
    return any(int(p.name.split("-")[2]) > newest for p in output.glob(".tmp-checkpoint-*"))


started = time.time()
assert exit_code(start({**settings, "output_dir": reference}), block=True) == 0
reference_seconds = time.time() - started
resume = {**settings, "training": {**settings["training"], "resume_from_checkpoint": "latest"}}
kills, during_saves, attempts, second_run = 0, 0, 0, None
while True:
    pid = start(resume if attempts else settings)
    attempts += 1
    if kills >= kills_wanted:  # this run may finish; while it holds the folder, a second run is refused
        lock = output / ".bitune.lock"
        wait(pid, 120, lambda: lock.is_file() and f"process {pid} " in lock.read_text())
        (output.parent / "second.json").write_text(json.dumps(resume))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            second_run = {"exit_code": main(["train", str(output.parent / "second.json")]), "stderr": stderr.getvalue()}
        assert exit_code(pid, block=True) == 0, "the last run failed"
        break
    if kills % 2 == 0:  # aimed at a save: a random moment inside the save after the next one
        step = published()
        code = wait(pid, 120, lambda: published() > step)
        if code is None:
            code = wait(pid, 120, saving)
        if code is None:
            code = wait(pid, rng.uniform(0, 0.004))
    else:  # any moment: loading, resuming, training or saving
        code = wait(pid, rng.uniform(0, reference_seconds / 2))
    if code is not None:
        assert code == 0, f"a run failed with exit code {code}"
        break
    os.kill(pid, signal.SIGKILL)
    exit_code(pid, block=True)
    kills += 1
    during_saves += bool(leftovers())  # a kill during a save leaves its staging folder behind
print(json.dumps({"kills": kills, "during_saves": during_saves, "attempts": attempts, "second_run": second_run}))
"""


def test_killed_at_random_times_then_resumed_ends_bit_identical(base, tmp_path):
    """kill -9 at random moments (every other one inside a checkpoint write), resume after each: the final
    weights and every logged loss equal those of an uninterrupted run, bit for bit."""
    output, reference = tmp_path / "killed", tmp_path / "reference"
    schedule = {
        "max_steps": 14,
        "save_steps": 1,
        "save_total_limit": 3,
        "trainer_args": {"disable_tqdm": True},
    }
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER,
            json.dumps(settings(base, output, training=schedule)),
            str(reference),
            "12",
            "0",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-5000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    print(f"kills: {report['kills']}, during saves: {report['during_saves']}, runs: {report['attempts']}")
    assert report["kills"] >= 10 and report["during_saves"] >= 4, report
    assert_same_weights(reference / "final", output / "final", atol=0)
    assert training_logs(output) == training_logs(reference)  # steps 1..14 once each, the same numbers
    assert not [p for p in output.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # cleaned up
    assert not (output / LOCK_FILE).exists()
    second = report["second_run"]
    assert second["exit_code"] == 2 and "is in use by another run (process" in second["stderr"], second


# ----------------------------------------------------------------------------------------------------------
# Resuming with changed settings


@pytest.fixture(scope="module")
def interrupted(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 4 steps with checkpoints at 2 and 4, cut back to checkpoint-2 (as if killed at step 3)."""
    folder = tmp_path_factory.mktemp("interrupted") / "run"
    run(
        base,
        folder,
        validation={"size": 5},
        training={"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant"},
    )
    for name in ("checkpoint-4", "final"):
        shutil.rmtree(folder / name)
    return folder


def resume_settings(base: Path, output: Path, **changes) -> dict:
    raw = settings(
        base,
        output,
        training={
            "max_steps": 4,
            "save_steps": 2,
            "lr_scheduler_type": "constant",
            "resume_from_checkpoint": "latest",
        },
    )
    for key, value in changes.items():
        section, _, name = key.partition(".")
        raw[section] = {**(raw.get(section) or {}), name: value}
    return raw


@pytest.fixture
def copy_of(interrupted: Path, tmp_path: Path) -> Path:
    shutil.copytree(interrupted, tmp_path / "run")
    return tmp_path / "run"


CHANGES = {
    "learning rate": ({"training.learning_rate": 2e-3}, "training.learning_rate 0.001 -> 0.002"),
    "schedule": ({"training.lr_scheduler_type": "linear"}, "training.lr_scheduler_type constant -> linear"),
    "max_steps": (
        {"training.max_steps": 6},
        "training.max_steps 4 -> 6 (the learning-rate schedule is re-stretched",
    ),
    "batch size": ({"training.batch_size": 2}, "training.batch_size 4 -> 2"),
    "seed": ({"training.seed": 1}, "training.seed 42 -> 1"),
    "clipping": ({"training.max_grad_norm": 0.5}, "training.max_grad_norm 1.0 -> 0.5"),
    "lora rank": ({"peft.r": 4}, "peft.r 8 -> 4"),
    "peft kind": ({"peft.kind": "dora"}, "peft.kind lora -> dora"),
    "target modules": ({"peft.target_modules": ["q_proj"]}, 'peft.target_modules .*_proj -> ["q_proj"]'),
    "bitune mode": ({"bitune.mode": "no_mixing"}, "bitune.mode bitune -> no_mixing"),
    "mixing constant": ({"bitune.c": 0.02}, "bitune.c 0.01 -> 0.02"),
    "data template": ({"data.template": "Q: {prompt} A:"}, "the training samples (20 samples"),
    "data limit": ({"data.limit": 10}, "data.limit null -> 10"),
    "held-out samples": ({"validation.size": 8}, "the training samples (20 samples"),
}


@pytest.mark.parametrize(("changes", "named"), CHANGES.values(), ids=CHANGES.keys())
def test_resume_with_a_changed_setting_is_refused_naming_it(base, copy_of, tmp_path, capsys, changes, named):
    assert cli_train(tmp_path, resume_settings(base, copy_of, **{"validation.size": 5, **changes})) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error.startswith(f"bitune train: error: cannot resume from {copy_of / 'checkpoint-2'}")
        and named in error
    )
    assert "--training.force_resume true" in error
    assert not (copy_of / "final").exists()
    assert yaml.safe_load((copy_of / "train_config.yaml").read_text())["training"]["learning_rate"] == 1e-3


def test_a_changed_base_model_or_data_file_is_named(base, copy_of, tmp_path, capsys):
    other = make_base(tmp_path / "other")  # the same shapes; another (random) model and the same rows
    rows = (base / "train.jsonl").read_text().splitlines()
    (other / "train.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    raw = resume_settings(base, copy_of, **{"validation.size": 5})
    assert cli_train(tmp_path, {**raw, "model": str(other / "model")}) == 2
    assert f"model.name_or_path {base / 'model'} -> {other / 'model'}" in capsys.readouterr().err
    assert cli_train(tmp_path, {**raw, "data": {**raw["data"], "path": str(other / "train.jsonl")}}) == 2
    error = capsys.readouterr().err
    assert "the training samples (20 samples" in error and "-> 19 samples" in error
    assert f"data.path {base / 'train.jsonl'} -> {other / 'train.jsonl'}" in error


def test_settings_that_may_change_on_resume_are_accepted(base, copy_of, tmp_path, capsys):
    raw = resume_settings(base, copy_of, **{"validation.size": 5})
    raw["training"].update(logging_steps=2, save_steps=1, save_total_limit=2, report_to=["tensorboard"])
    assert cli_train(tmp_path, raw, "--device", "cpu", "--training.eval_batch_size", "2") == 0
    assert (copy_of / "final").is_dir() and (copy_of / "checkpoint-4").is_dir()


def test_forced_resume_applies_the_new_learning_rate_and_says_so(base, copy_of, tmp_path, capsys):
    raw = resume_settings(base, copy_of, **{"validation.size": 5, "training.learning_rate": 2e-3})
    assert cli_train(tmp_path, raw, "--training.force_resume", "true") == 0
    err = capsys.readouterr().err
    assert "forced resume from" in err and "training.learning_rate 0.001 -> 0.002" in err
    logs = training_logs(copy_of)
    assert [record["learning_rate"] for record in logs] == [1e-3, 1e-3, 2e-3, 2e-3]  # what the run claims
    assert yaml.safe_load((copy_of / "train_config.yaml").read_text())["training"]["learning_rate"] == 2e-3
    # The new checkpoints record the new settings: resuming them with these settings is not forced again.
    assert (
        json.loads((copy_of / "checkpoint-4" / RUN_FILE).read_text())["settings"]["training.learning_rate"]
        == 2e-3
    )


def test_a_changed_max_steps_restretches_the_schedule_only_when_forced(base, copy_of, tmp_path, capsys):
    """Issue 17, 6: the schedule of a run resumed with another max_steps is re-stretched; refused unless forced."""
    raw = resume_settings(base, copy_of, **{"validation.size": 5, "training.lr_scheduler_type": "constant"})
    raw["training"]["max_steps"] = 6
    assert cli_train(tmp_path, raw) == 2
    assert "training.max_steps 4 -> 6 (the learning-rate schedule is re-stretched" in capsys.readouterr().err
    assert cli_train(tmp_path, raw, "--training.force_resume") == 0
    err = capsys.readouterr().err
    assert "re-stretched" in err and "the schedule now ends at step 6" in err
    assert [record["step"] for record in training_logs(copy_of)] == [1, 2, 3, 4, 5, 6]


def test_forced_resume_of_adapters_that_cannot_fit_is_still_refused(base, copy_of, tmp_path, capsys):
    raw = resume_settings(base, copy_of, **{"validation.size": 5, "peft.r": 4})
    assert cli_train(tmp_path, raw, "--training.force_resume", "true") == 2
    assert "adapter weights do not fit the model" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_checkpoint_without_a_record_resumes_only_when_forced(base, copy_of, tmp_path, capsys):
    (copy_of / "checkpoint-2" / RUN_FILE).unlink()
    raw = resume_settings(base, copy_of, **{"validation.size": 5})
    assert cli_train(tmp_path, raw) == 2
    assert "has no bitune_run.json" in capsys.readouterr().err
    assert cli_train(tmp_path, raw, "--training.force_resume", "true") == 0


# ----------------------------------------------------------------------------------------------------------
# The output folder


def test_a_second_run_into_a_folder_in_use_is_refused(base, tmp_path, capsys):
    output = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; import bitune.files as f\n"
            "with f.lock_folder(Path(sys.argv[1]), '.bitune.lock', 'output_dir'):\n"
            "    print('locked', flush=True); time.sleep(120)\n",
            str(output),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_train(tmp_path, settings(base, output)) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"output_dir {output} is in use by another run (process {holder.pid} on " in error
    finally:
        holder.kill()
        holder.wait()
    assert cli_train(tmp_path, settings(base, output)) == 0  # the lock died with its holder
    assert not (output / LOCK_FILE).exists()


def test_what_interrupted_saves_left_is_removed_on_the_next_start(base, copy_of, tmp_path, capsys):
    leftovers = [
        ".tmp-checkpoint-3/checkpoint-3/optimizer.pt",  # the Trainer's staging folder
        ".tmp-checkpoint-3-a1b2c3d4/adapter_config.json",  # the publishing rename's
        ".tmp-final-k3j4h5g6/bitune_config.json",
        ".tmp-train_config.yaml-x1y2z3w4",
    ]
    for name in leftovers:
        (copy_of / name).parent.mkdir(parents=True, exist_ok=True)
        (copy_of / name).write_bytes(b"\0" * 1000)
    (copy_of / ".tmp-notes.txt").write_text("not ours")
    assert cli_train(tmp_path, resume_settings(base, copy_of, **{"validation.size": 5})) == 0
    assert sorted(p.name for p in copy_of.glob(".*")) == [".tmp-notes.txt"]
    assert "left by an interrupted save" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Starting a run (issue 17: 1 and 2)


def test_the_shipped_recipe_trains_on_a_cpu_as_written(base, tmp_path, capsys):
    """configs/paper_lora.yaml asks for bf16; a machine without a GPU trains in fp32 and says so in one line."""
    output = tmp_path / "run"
    code = main(
        [
            "train",
            str(REPO / "configs" / "paper_lora.yaml"),
            "--model",
            str(base / "model"),
            "--data",
            str(base / "train.jsonl"),
            "--data.max_length",
            "64",  # the tiny model reads 128 positions
            "--training.max_steps",
            "1",
            "--output_dir",
            str(output),
        ]
    )
    assert code == 0 and (output / "final").is_dir()
    err = capsys.readouterr().err
    note = "training.precision bf16: mixed precision needs a GPU, so this run trains in fp32 on the CPU"
    if torch.cuda.is_available():
        assert note not in err
    else:
        assert len([line for line in err.splitlines() if note in line]) == 1
        assert yaml.safe_load((output / "train_config.yaml").read_text())["training"]["precision"] == "fp32"


def test_the_start_says_what_the_run_will_do(base, tmp_path, capsys):
    raw = settings(
        base,
        tmp_path / "run",
        data={"max_length": 16, "overlong": "truncate"},
        validation={"size": 5},
        training={"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 3},
    )
    assert cli_train(tmp_path, raw) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"data +25 rows -> 25 samples \(dropped: 0 empty, 0 too long; truncated: 2[0-9]\)", err
    ), err
    assert "; 20 train, 5 validation" in err
    assert (
        "3 optimizer steps x effective batch 6 (batch 2 x accumulation 3 x 1 process) = 18 samples, 0.90 epochs"
        in err
    )
    model = BituneModel.from_pretrained(tmp_path / "run" / "final")
    adapters = {
        name: sum(p.numel() for n, p in model.peft_model.named_parameters() if f".{name}." in n)
        for name in ("causal", "bidir")
    }
    assert (
        f"trainable   {sum(adapters.values()) + 4:,} parameters: adapters {sum(adapters.values()):,} "
        f"(causal {adapters['causal']:,}, bidir {adapters['bidir']:,}), mixing coefficients 4"
    ) in err
    assert "device      cpu, precision fp32 (base weights float32)" in err


def test_the_docs_list_every_setting_that_may_change_on_resume():
    from bitune.training.trainer import MAY_CHANGE_ON_RESUME

    guarantees = (REPO / "docs" / "training.md").read_text().split("may change on resume")[1].split("\n\n")[0]
    assert all(f"`{key}`" in guarantees for key in MAY_CHANGE_ON_RESUME)
