"""The experiment grid runner: a tiny grid end to end, resuming, changed settings, bad configs."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from bitune.cli import main
from bitune.errors import BituneInputError
from bitune.experiments.cells import run_experiment
from bitune.experiments.layout import (
    BASE_EVAL_FILE,
    BASE_MODEL_DIR,
    CELL_FILE,
    DATA_DIR,
    DONE_FILE,
    EVAL_FILE,
    EXPERIMENT_FILE,
    METRICS_FILE,
)
from bitune.experiments.settings import UltraFeedbackSettings, load_experiment
from bitune.experiments.stages import prepare_stages, ultrafeedback_rows
from bitune.training.outputs import TRAIN_CONFIG_FILE

QUIZ_ROWS = [
    {"question": "where is mary ?", "options": ["garden", "kitchen"], "label": 0},
    {"question": "who has the ball ?", "options": ["john", "mary"], "label": 1},
    {"question": "where is the key ?", "options": ["office", "cellar", "garage"], "label": 2},
]
TASK_ITEMS = {"person_location": 2, "object_holder": 2, "quiz": 3}
STEPS = 3


def tiny_experiment(root: Path) -> dict:
    """A 2 methods x 1 PEFT kind x 2 seeds grid on a 2-layer Llama pretrained for 2 steps."""
    (root / "quiz.jsonl").write_text("".join(json.dumps(row) + "\n" for row in QUIZ_ROWS))
    quiz = {"name": "quiz", "kind": "multiple_choice", "data": "quiz.jsonl", "question": "question",
            "choices": "options", "answer": "label"}  # fmt: skip
    (root / "quiz.yaml").write_text(yaml.safe_dump(quiz))
    return {
        "output_dir": str(root / "out"),
        "train": {
            "validation": {"size": 4},
            "peft": {"r": 4},
            "training": {
                "max_steps": STEPS,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "precision": "fp32",
                "logging_steps": 1,
                "eval_steps": STEPS,
                "save_steps": STEPS,
                "report_to": [],
            },  # fmt: skip
            "device": "cpu",
        },
        "grid": {"methods": ["baseline", "bitune"], "peft": ["lora"], "seeds": [1, 2]},
        "synthetic": {"task_types": ["person_location", "object_holder"], "n_train": 24, "n_test": 4},
        "pretrain": {
            "stories": 40,
            "steps": 2,
            "batch_size": 4,
            "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
        },  # fmt: skip
        "evaluation": {"tasks": ["synthetic", str(root / "quiz.yaml")], "batch_size": 4},
    }


def write_config(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    return tiny_experiment(tmp_path_factory.mktemp("experiment"))


@pytest.fixture(scope="module")
def finished(config, tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("config") / "experiment.yaml", config)
    experiment = load_experiment(path)
    return experiment, run_experiment(experiment)


def cell_dirs(experiment) -> dict[str, Path]:
    return {cell.name: experiment.cell_dir(cell) for cell in experiment.cells()}


def losses(folder: Path) -> list[float]:
    lines = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_grid_runs_end_to_end(finished):
    experiment, outcome = finished
    names = ["baseline-lora-seed1", "baseline-lora-seed2", "bitune-lora-seed1", "bitune-lora-seed2"]
    assert outcome == dict.fromkeys(names, "trained")

    root = experiment.root
    assert len((root / DATA_DIR / "train.jsonl").read_text().splitlines()) == 24
    assert (root / BASE_MODEL_DIR / "config.json").is_file()
    recorded = json.loads((root / EXPERIMENT_FILE).read_text())
    assert [cell["name"] for cell in recorded["cells"]] == names
    assert {task["name"]: task["metric"] for task in recorded["tasks"]} == {
        "person_location": "exact_match", "object_holder": "exact_match", "quiz": "acc",
    }  # fmt: skip
    assert set(json.loads((root / BASE_EVAL_FILE).read_text())["tasks"]) == set(TASK_ITEMS)

    for name, folder in cell_dirs(experiment).items():
        method, _, seed = name.split("-")
        assert (folder / DONE_FILE).is_file() and (folder / "final" / "bitune_config.json").is_file()
        settings = yaml.safe_load((folder / TRAIN_CONFIG_FILE).read_text())
        assert settings["bitune"]["mode"] == method and f"seed{settings['training']['seed']}" == seed
        evaluation = json.loads((folder / EVAL_FILE).read_text())
        for task, count in TASK_ITEMS.items():
            scores = evaluation["tasks"][task]
            metric = scores["metric"]
            assert len(scores["items"]["id"]) == len(scores["items"][metric]) == count
            assert set(scores["items"][metric]) <= {0.0, 1.0}
            assert scores["metrics"][metric]["value"] == sum(scores["items"][metric]) / count
            expected = {"exact_match", "acc", "acc_norm"} if task != "quiz" else {"acc", "acc_norm"}
            assert set(scores["metrics"]) == expected and set(scores["items"]) == expected | {"id"}
        layers = {"keys": 2, "values": 2} if method == "bitune" else {}
        assert {kind: len(values) for kind, values in evaluation["alphas"].items()} == layers
        lines = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
        assert [line["step"] for line in lines if "loss" in line] == list(range(1, STEPS + 1))
        assert any("eval_loss" in line for line in lines)


def test_rerun_skips_done_cells_and_redoes_unfinished_ones(finished):
    experiment, _ = finished
    folders = cell_dirs(experiment)
    untouched = folders["baseline-lora-seed2"]
    done_before = (untouched / DONE_FILE).read_text()

    # Interrupted after training: the final checkpoint is there, the scores are not.
    (folders["baseline-lora-seed1"] / DONE_FILE).unlink()
    (folders["baseline-lora-seed1"] / EVAL_FILE).unlink()
    # Interrupted before training finished: nothing but the cell marker and the log.
    crashed = folders["bitune-lora-seed1"]
    losses_before = losses(crashed)
    for item in crashed.iterdir():
        if item.name not in (CELL_FILE, METRICS_FILE):
            item.unlink() if item.is_file() else shutil.rmtree(item)

    outcome = run_experiment(experiment)
    assert outcome == {
        "baseline-lora-seed1": "evaluated",
        "baseline-lora-seed2": "skipped",
        "bitune-lora-seed1": "trained",
        "bitune-lora-seed2": "skipped",
    }
    assert (untouched / DONE_FILE).read_text() == done_before
    assert (folders["baseline-lora-seed1"] / EVAL_FILE).is_file()
    assert losses(crashed) == pytest.approx(losses_before)  # the same run again, not a continuation


def test_changed_evaluation_reevaluates_and_changed_training_is_refused(finished, config, tmp_path):
    experiment, _ = finished
    metric_changed = copy.deepcopy(config)
    metric_changed["evaluation"]["tasks"][0] = {"name": "synthetic", "metric": "acc"}  # shown, not computed
    changed = load_experiment(write_config(tmp_path / "metric.yaml", metric_changed))
    assert set(run_experiment(changed, only=["bitune-*"]).values()) == {"skipped"}

    evaluation_changed = copy.deepcopy(config)
    evaluation_changed["evaluation"]["max_new_tokens"] = 2
    changed = load_experiment(write_config(tmp_path / "evaluation.yaml", evaluation_changed))
    assert set(run_experiment(changed, only=["bitune-*"]).values()) == {"evaluated"}

    training_changed = copy.deepcopy(config)
    training_changed["train"]["training"]["learning_rate"] = 2e-3
    changed = load_experiment(write_config(tmp_path / "training.yaml", training_changed))
    with pytest.raises(BituneInputError, match=r"other settings \(train\.training\.learning_rate changed\)"):
        run_experiment(changed, only=["bitune-lora-seed1"])

    stage_changed = copy.deepcopy(config)
    stage_changed["pretrain"]["steps"] = 3
    with pytest.raises(
        BituneInputError, match=r"base_model was built with other settings \(pretrain\.steps\)"
    ):
        prepare_stages(load_experiment(write_config(tmp_path / "stage.yaml", stage_changed)))


def test_command_line_lists_cells_and_writes_the_report(finished, config, tmp_path, capsys):
    experiment, _ = finished
    path = write_config(tmp_path / "experiment.yaml", config)
    assert main(["experiment", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" done") == 4
    assert main(["experiment", str(path), "--only", "baseline-*"]) == 0  # all done: only the report
    report = experiment.root / "report" / "report.md"
    assert "| **bitune** |" in report.read_text()
    assert main(["experiment", str(path), "--only", "nothing-*"]) == 2
    assert "no cell matches" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["grid"].update(methods=["baseline", "bidir"]),
            r"grid\.methods: 'bidir' is not a method",
        ),
        (lambda c: c["grid"].update(peft=[{"r": 4}]), r"grid\.peft: .* names no PEFT kind"),
        (lambda c: c["grid"].update(seeds=[1, 1]), r"grid\.seeds lists an entry twice"),
        (lambda c: c.pop("grid"), r"grid is required"),
        (lambda c: c.update(evalution={}), r"unknown key 'evalution'"),
        (lambda c: c["train"]["training"].update(learning_rat=1), r"unknown key 'training\.learning_rat'"),
        (
            lambda c: c["evaluation"].update(tasks=[{"name": "piqa", "limt": 3}]),
            r"evaluation\.tasks\[0\]: unknown key 'limt'",
        ),
        (lambda c: c.pop("synthetic"), r"'synthetic' needs a synthetic: section"),
        (lambda c: c["pretrain"].update(steps="many"), r"pretrain\.steps must be an integer"),
        (lambda c: c.update(llama2c={"checkpoint": "a.bin", "tokenizer": "t.bin"}), r"pretrain and llama2c"),
    ],
)
def test_bad_config_names_the_key(config, tmp_path, change, message):
    broken = copy.deepcopy(config)
    change(broken)
    path = write_config(tmp_path / "bad.yaml", broken)
    with pytest.raises(BituneInputError, match=message) as error:
        load_experiment(path)
    assert str(path) in str(error.value)


def test_train_base_is_read_like_a_training_config(config, tmp_path):
    with_base = copy.deepcopy(config)
    with_base["train"]["base"] = str(tmp_path / "base.yaml")
    path = write_config(tmp_path / "experiment.yaml", with_base)
    with pytest.raises(BituneInputError, match=r"base\.yaml: no such config file"):
        load_experiment(path)
    (tmp_path / "base.yaml").write_text("")  # as for `bitune train`: an empty file sets nothing
    assert (
        load_experiment(path).train_mapping()
        == load_experiment(write_config(tmp_path / "plain.yaml", config)).train_mapping()
    )


def test_base_experiment_is_extended_key_by_key(config, tmp_path):
    base = write_config(tmp_path / "base.yaml", config)
    child = {
        "base": str(base),
        "output_dir": str(tmp_path / "child"),
        "pretrain": None,  # drops the section: the child reuses a model instead
        "train": {"model": "some/model", "training": {"max_steps": 5}},
        "grid": {"methods": ["bitune"]},
    }
    experiment = load_experiment(write_config(tmp_path / "child.yaml", child))
    assert experiment.output_dir == str(tmp_path / "child")
    assert experiment.pretrain is None and experiment.synthetic is not None
    assert (experiment.grid.methods, experiment.grid.seeds) == (["bitune"], [1, 2])
    training = experiment.train_mapping()["training"]
    assert (training["max_steps"], training["batch_size"]) == (5, 4)  # nested: replaced key, inherited key
    assert experiment.train_config(experiment.cells()[0]).model.name_or_path == "some/model"


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.yaml": {"base": "{tmp}/missing.yaml"}}, r"missing\.yaml: no such experiment file"),
        ({"a.yaml": {"base": ["x.yaml"]}}, r"a\.yaml: base must be the path of another experiment file"),
        (
            {"a.yaml": {"base": "{tmp}/b.yaml"}, "b.yaml": {"base": "{tmp}/a.yaml"}},
            r"b\.yaml: .* \(a cycle\)",
        ),
        (
            {"a.yaml": {"base": "{tmp}/b.yaml"}, "b.yaml": {"evalution": {}}},
            r"a\.yaml \(on top of .*b\.yaml\).*unknown key 'evalution'",
        ),
    ],
)
def test_bad_base_is_named(tmp_path, files, message):
    for name, mapping in files.items():
        text = yaml.safe_dump(mapping).replace("{tmp}", str(tmp_path))
        (tmp_path / name).write_text(text)
    with pytest.raises(BituneInputError, match=message):
        load_experiment(tmp_path / "a.yaml")


def test_bad_config_exits_with_2(config, tmp_path, capsys):
    broken = copy.deepcopy(config)
    broken["grid"]["methods"] = ["lora"]
    assert main(["experiment", str(write_config(tmp_path / "bad.yaml", broken))]) == 2
    assert "grid.methods" in capsys.readouterr().err


def test_ultrafeedback_rows_take_the_named_models_answer(tmp_path):
    def row(instruction, *models):
        completions = [
            {"model": model, "response": f"{model} says hi", "overall_score": 5} for model in models
        ]
        return {"source": "test", "instruction": instruction, "completions": completions}

    path = tmp_path / "ultrafeedback.jsonl"
    rows = [row("one", "llama-2-7b", "gpt-4", "gpt-4"), row("two", "falcon-40b"), row("three", "gpt-4")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ultrafeedback_rows(UltraFeedbackSettings(path=str(path))) == [
        {"prompt": "one", "completion": "gpt-4 says hi"},
        {"prompt": "three", "completion": "gpt-4 says hi"},
    ]
    with pytest.raises(BituneInputError, match="no completion is by model 'gpt-5'"):
        ultrafeedback_rows(UltraFeedbackSettings(path=str(path), model="gpt-5"))
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(BituneInputError, match="line 2: expected UltraFeedback's fields"):
        ultrafeedback_rows(UltraFeedbackSettings(path=str(path)))
