"""Training: configs, the Trainer subclass (loss scaling, checkpoints, resume), metrics and the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.trainer_utils import get_last_checkpoint

from bitune import BituneConfig, BituneError, BituneInputError, BituneModel
from bitune.cli import main
from bitune.core.checkpoint import MIXER_FILE
from bitune.data.samples import Sample
from bitune.training import (
    BituneCollator,
    BituneTrainer,
    TrainConfig,
    latest_checkpoint,
    load_config,
    restore_weights,
    train,
)

REPO = Path(__file__).resolve().parents[2]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :?.,\n+="


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (lower-cased), BOS added like Llama's: fits the tiny models' 64-token vocabulary."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_base(folder: Path) -> Path:
    """A tiny random Llama + character tokenizer saved as a model folder, and 25 addition problems."""
    tiny_model("llama").save_pretrained(folder / "model")
    char_tokenizer().save_pretrained(folder / "model")
    rows = [{"prompt": f"what is {a}+{b}?", "completion": str(a + b)} for a in range(5) for b in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


def settings(base: Path, output_dir: Path, **sections) -> dict:
    """A small fast run as plain data; `sections` are merged into it ({"training": {"max_steps": 4}})."""
    raw = {
        "model": str(base / "model"),
        "data": {"path": str(base / "train.jsonl"), "max_length": 64},
        "training": {
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "precision": "fp32",
            "save_steps": 0,
            "logging_steps": 1,
            "report_to": [],
        },
        "output_dir": str(output_dir),
        "device": "cpu",
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def run(base: Path, output_dir: Path, **sections) -> Path:
    return train(TrainConfig.from_dict(settings(base, output_dir, **sections)))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every trained tensor of a Bitune checkpoint: both adapters and the mixing coefficients."""
    files = {path.parent.name: path for path in checkpoint.glob("*/adapter_model.safetensors")}
    if (checkpoint / MIXER_FILE).is_file():
        files["mixer"] = checkpoint / MIXER_FILE
    return {f"{part}/{key}": value for part, path in files.items() for key, value in load_file(path).items()}


def assert_same_weights(first: Path, second: Path, atol: float = 1e-6) -> None:
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def training_logs(output_dir: Path) -> list[dict]:
    return [record for record in metrics(output_dir) if "loss" in record]


# ----------------------------------------------------------------------------------------------------------
# Configs


def test_yaml_config_with_overrides_gives_typed_settings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: org/model\n"
        "data: {path: train.jsonl, max_length: 256}\n"
        "training: {learning_rate: 1e-3, max_steps: 100}\n"  # PyYAML reads 1e-3 as text
        "output_dir: runs/a\n"
    )
    config = load_config(
        path,
        [
            "--training.learning_rate=2e-4",
            "--bitune.mode",
            "baseline",
            "--peft.target_modules",
            "[q_proj, v_proj]",
            "--training.activation_checkpointing",
            "--validation.size",
            "0.1",
            "--data",
            "other.jsonl",
        ],
    )
    assert config.model.name_or_path == "org/model"
    assert config.training.learning_rate == 2e-4 and config.training.max_steps == 100
    assert config.bitune == BituneConfig(mode="baseline")
    assert config.peft.target_modules == ["q_proj", "v_proj"]
    assert config.training.activation_checkpointing is True
    assert config.validation.size == 0.1
    assert config.data.path == "other.jsonl" and config.data.max_length == 256
    assert load_config(path).training.learning_rate == 1e-3
    # What a run writes as train_config.yaml reads back as the same config.
    copy = tmp_path / "copy.yaml"
    copy.write_text(config.to_yaml())
    assert load_config(copy) == config


VALID = "model: m\ndata: d.jsonl\noutput_dir: o\n"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (VALID + "trainig: {max_steps: 3}", [], r"run\.yaml: unknown key 'trainig'"),
        (
            VALID + "training: {lr: 3}",
            [],
            r"run\.yaml: unknown key 'training\.lr'; known keys in training: learning_rate",
        ),
        (VALID, ["--training.lr", "1"], r"command line \(--training\.lr\): unknown key 'lr'"),
        (
            VALID,
            ["--training.max_steps", "many"],
            r"run\.yaml.*training\.max_steps must be an integer, got 'many'",
        ),
        (VALID, ["--bitune.mode", "bidir"], r"bitune\.mode must be one of bitune, naive_bidir"),
        (VALID, ["--peft.kind", "lorra"], r"peft\.kind 'lorra' is unknown"),
        (VALID, ["--data.format", "alpacca"], r"data config, field 'format'"),
        ("model: m\ndata: d.jsonl\n", [], r"run\.yaml: output_dir is required"),
        ("- a list", [], r"run\.yaml: expected a mapping"),
        (VALID, ["training.max_steps", "3"], r"expected --key value"),
    ],
)
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(BituneInputError, match=message):
        load_config(path, overrides)


def test_shipped_configs_are_the_papers_recipe():
    lora = load_config(REPO / "configs" / "paper_lora.yaml")
    assert (lora.peft.kind, lora.peft.r, lora.peft.alpha, lora.peft.dropout, lora.peft.target_modules) == (
        "lora",
        8,
        1.0,
        0.0,
        ".*_proj",
    )
    training = lora.training
    assert (training.learning_rate, training.lr_scheduler_type, training.warmup_ratio) == (
        3e-4,
        "linear",
        0.1,
    )
    assert (training.max_steps, training.batch_size * training.gradient_accumulation_steps) == (3000, 10)
    assert (training.adam_beta1, training.adam_beta2, training.weight_decay, training.max_grad_norm) == (
        0.9,
        0.999,
        0.0,
        1.0,
    )
    assert (training.precision, training.seed, lora.data.max_length, lora.data.template) == (
        "bf16",
        42,
        512,
        "plain",
    )
    assert lora.bitune == BituneConfig()
    for variant, kind in (("paper_dora", "dora"), ("paper_ia3", "ia3")):
        config = load_config(REPO / "configs" / f"{variant}.yaml", ["--bitune.mode", "naive_bidir"])
        assert config.peft.kind == kind and config.bitune.mode == "naive_bidir"
        assert (
            config.training
            == TrainConfig.from_dict(
                {"model": "m", "data": "d", "output_dir": "o", "training": {"save_steps": 500}}
            ).training
        )
    assert load_config(REPO / "configs" / "paper_dora.yaml").peft.to_peft_config().use_dora
    assert (
        json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())["zero_optimization"]["stage"]
        == 2
    )
    for launcher in (REPO / "configs" / "accelerate").glob("*.yaml"):
        assert yaml.safe_load(launcher.read_text())["distributed_type"] in ("MULTI_GPU", "DEEPSPEED")


# ----------------------------------------------------------------------------------------------------------
# Training runs


def test_collator_pads_prompts_left_and_answers_right():
    batch = BituneCollator(pad_token_id=0)(
        [Sample([1, 5, 6], [7, 2]), {"prompt_ids": [1, 8], "answer_ids": [2]}]
    )
    assert batch["prompt_ids"].tolist() == [[1, 5, 6], [0, 1, 8]]
    assert batch["answer_ids"].tolist() == [[7, 2], [2, 0]]
    assert batch["answer_mask"].tolist() == [[1, 1], [1, 0]]


def test_a_run_writes_metrics_checkpoints_and_a_loadable_final_model(base, tmp_path):
    final = run(
        base,
        tmp_path,
        validation={"size": 5},
        training={
            "max_steps": 4,
            "save_steps": 2,
            "eval_steps": 2,
            "warmup_ratio": 0.25,
            "report_to": ["tensorboard"],
        },
    )
    assert final == tmp_path / "final"
    logs = training_logs(tmp_path)
    assert [record["step"] for record in logs] == [1, 2, 3, 4]
    # Linear warmup over 1 step, then linear decay to 0 at step 4 (the rate of each step is logged).
    assert [record["learning_rate"] for record in logs] == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    for record in logs:
        assert record["loss"] > 0 and record["grad_norm"] > 0
        assert len(record["alphas"]["keys"]) == len(record["alphas"]["values"]) == 2  # one per layer
    assert logs[0]["alphas"]["keys"] == [0.5, 0.5]  # c / (c + c) before the first update
    assert logs[-1]["alphas"]["keys"] != [0.5, 0.5]  # the mixing coefficients train
    assert [record["step"] for record in metrics(tmp_path) if "eval_loss" in record] == [2, 4]
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))

    for step in (2, 4):
        checkpoint = tmp_path / f"checkpoint-{step}"
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "tokenizer.json"):
            assert (checkpoint / name).is_file(), name
        alphas = BituneModel.from_pretrained(checkpoint).alphas()
        for kind in ("keys", "values"):
            assert alphas[kind] == pytest.approx(logs[step - 1]["alphas"][kind])
    assert_same_weights(tmp_path / "checkpoint-4", final, atol=0)
    assert load_config(tmp_path / "train_config.yaml").training.max_steps == 4
    assert not list(tmp_path.glob(".tmp-*"))


def test_loss_is_normalised_over_the_whole_step_with_gradient_accumulation(base, tmp_path):
    """Batch 4, or 2 x 2 accumulation steps, or 1 x 4: the same answer tokens give the same loss and update."""
    finals, losses = [], []
    for batch_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        output_dir = tmp_path / f"b{batch_size}"
        finals.append(
            run(
                base,
                output_dir,
                training={"batch_size": batch_size, "gradient_accumulation_steps": accumulation},
            )
        )
        losses.append([record["loss"] for record in training_logs(output_dir)])
    for final, trajectory in zip(finals[1:], losses[1:]):
        assert trajectory == pytest.approx(losses[0], abs=1e-5)
        assert_same_weights(finals[0], final, atol=1e-6)


def test_activation_checkpointing_gives_the_same_weights(base, tmp_path):
    plain = run(base, tmp_path / "plain")
    checkpointed = run(base, tmp_path / "checkpointed", training={"activation_checkpointing": True})
    assert_same_weights(plain, checkpointed, atol=1e-6)
    for plain_log, checkpointed_log in zip(
        training_logs(tmp_path / "plain"), training_logs(tmp_path / "checkpointed")
    ):
        assert checkpointed_log["loss"] == pytest.approx(plain_log["loss"], abs=1e-6)
        assert checkpointed_log["grad_norm"] == pytest.approx(plain_log["grad_norm"], abs=1e-6)


def test_ablation_is_one_switch_and_has_no_mixing_to_log(base, tmp_path):
    final = run(base, tmp_path, bitune={"mode": "baseline"}, training={"max_steps": 1})
    assert "alphas" not in training_logs(tmp_path)[0]
    assert sorted(path.name for path in final.iterdir() if path.is_dir()) == ["causal"]
    assert BituneModel.from_pretrained(final).bitune_config.mode == "baseline"


CRASHING_RUN = """
import os, sys, torch
from bitune.training import BituneTrainer, TrainConfig, train
save_rng_state = BituneTrainer._save_rng_state

def die_at_step_4(self, output_dir):
    if self.state.global_step == 4:  # model, optimizer and scheduler of checkpoint-4 are written by now
        os._exit(17)
    save_rng_state(self, output_dir)

BituneTrainer._save_rng_state = die_at_step_4
torch.set_num_threads(1)
train(TrainConfig.from_dict(eval(sys.argv[1])))
"""


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint_exactly(base, tmp_path):
    schedule = {"max_steps": 6, "save_steps": 2, "batch_size": 4}  # 20 samples: the data is read ~1.2 times
    reference = run(base, tmp_path / "reference", training=schedule)

    interrupted = tmp_path / "interrupted"
    process = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, repr(settings(base, interrupted, training=schedule))],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 17, process.stderr[-3000:]
    partial = interrupted / ".tmp-checkpoint-4" / "checkpoint-4"
    assert (partial / "optimizer.pt").is_file() and not (partial / "trainer_state.json").exists()
    assert latest_checkpoint(interrupted) == interrupted / "checkpoint-2"
    assert get_last_checkpoint(str(interrupted)) == str(interrupted / "checkpoint-2")
    BituneModel.from_pretrained(interrupted / "checkpoint-2")

    with pytest.raises(BituneInputError, match="already holds a run"):
        run(base, interrupted, training=schedule)
    resumed = run(base, interrupted, training={**schedule, "resume_from_checkpoint": "latest"})
    assert_same_weights(reference, resumed, atol=1e-6)
    assert [record["step"] for record in training_logs(interrupted)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in training_logs(interrupted)] == pytest.approx(
        [r["loss"] for r in training_logs(tmp_path / "reference")], abs=1e-6
    )
    assert not (interrupted / ".tmp-checkpoint-4").exists()


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_restore_weights_loads_in_place_and_keeps_everything_trainable(base, tmp_path, kind):
    config = TrainConfig.from_dict(settings(base, tmp_path, peft={"kind": kind}))

    def fresh() -> BituneModel:
        torch.manual_seed(0)
        return BituneModel.from_base(str(base / "model"), config.peft.to_peft_config(), config.bitune).train()

    trained = fresh()
    with torch.no_grad():
        for parameter in trained.trainable_parameters().values():
            parameter.add_(torch.randn_like(parameter))
    trained.save_pretrained(tmp_path / "saved")

    model = fresh()
    before = model.trainable_parameters()
    restore_weights(model, tmp_path / "saved")
    after = model.trainable_parameters()
    assert before.keys() == after.keys() == trained.trainable_parameters().keys()
    for name, parameter in after.items():
        assert parameter is before[name] and parameter.requires_grad
        torch.testing.assert_close(parameter, trained.trainable_parameters()[name], atol=0, rtol=0)

    other_mode = BituneModel.from_base(
        str(base / "model"), config.peft.to_peft_config(), BituneConfig(mode="no_mixing")
    )
    with pytest.raises(BituneInputError, match="resume with the settings the checkpoint was trained with"):
        restore_weights(other_mode, tmp_path / "saved")


def test_unsupported_parallel_setups_are_refused_before_training():
    def refusal(**state) -> str:
        trainer = types.SimpleNamespace(
            args=types.SimpleNamespace(n_gpu=state.get("n_gpu", 1), fsdp=state.get("fsdp", False)),
            is_deepspeed_enabled="zero_stage" in state,
            is_fsdp_enabled=False,
            accelerator=types.SimpleNamespace(
                state=types.SimpleNamespace(
                    deepspeed_plugin=types.SimpleNamespace(zero_stage=state.get("zero_stage"))
                )
            ),
        )
        with pytest.raises(BituneError) as error:
            BituneTrainer._check_parallelism(trainer)
        return str(error.value)

    assert "ZeRO-3 is not supported" in refusal(zero_stage=3)
    assert "FSDP through the Trainer is not supported yet" in refusal(fsdp=True)
    assert "DataParallel" in refusal(n_gpu=2)
    supported = types.SimpleNamespace(
        args=types.SimpleNamespace(n_gpu=1, fsdp=False),
        is_deepspeed_enabled=True,
        is_fsdp_enabled=False,
        accelerator=types.SimpleNamespace(
            state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=2))
        ),
    )
    BituneTrainer._check_parallelism(supported)


# ----------------------------------------------------------------------------------------------------------
# Command line


def test_cli_help_teaches_with_examples(capsys):
    for command in ("train", "generate", "chat"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"bitune {command} " in text.split("examples:")[1]
        if command == "train":
            assert "--bitune.mode baseline" in text and "--training.resume_from_checkpoint latest" in text


def test_cli_bad_config_exits_2_with_the_key_named(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d.jsonl\noutput_dir: o\ntraining: {max_step: 3}\n")
    assert main(["train", str(path)]) == 2
    assert "unknown key 'training.max_step'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_cli_end_to_end_on_real_data_with_the_real_tiny_model(
    stories260k, shared_data, tmp_path, capsys, monkeypatch
):
    """Train stories260K on a few Alpaca-GPT4 rows through the CLI, then generate and chat with the result."""
    output_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(stories260k),
                "data": {
                    "path": str(shared_data / "instruct" / "alpaca_gpt4_999.json"),
                    "max_length": 96,
                    "limit": 12,
                },
                "validation": {"size": 4},
                "training": {
                    "max_steps": 3,
                    "batch_size": 4,
                    "precision": "fp32",
                    "logging_steps": 1,
                    "save_steps": 2,
                    "report_to": [],
                },
                "output_dir": str(output_dir),
            }
        )
    )
    assert main(["train", str(config), "--device", "cpu", "--training.learning_rate", "1e-3"]) == 0
    assert "Final model:" in capsys.readouterr().out
    logs = training_logs(output_dir)
    assert [record["step"] for record in logs] == [1, 2, 3]
    assert all({"loss", "learning_rate", "grad_norm", "alphas"} <= record.keys() for record in logs)
    assert len(logs[0]["alphas"]["values"]) == 5  # stories260K has 5 layers
    assert any("eval_loss" in record for record in metrics(output_dir))

    final = output_dir / "final"
    arguments = ["--checkpoint", str(final), "--device", "cpu", "--max-new-tokens", "8"]
    prompts = ["Tell me a story.", "Name a color."]
    assert main(["generate", *arguments, "--json", "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [answer["prompt"] for answer in answers] == prompts

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompts[0]}\n\n"))  # one message, then an empty line
    assert main(["chat", *arguments]) == 0
    streamed = capsys.readouterr().out.split("model> ")[1].split("\nyou> ")[0]
    assert streamed.strip() == answers[0]["answer"]  # streaming gives the greedy answer of `generate`
