"""Every bad input a user can give the `bitune` command ends in one line naming the culprit and exit code 2.

The table runs each case through `bitune.cli.main` in-process: config files and settings, models, data files,
resumes, checkpoints, decoding options, exports and task specs. Each case asserts exit code 2, exactly one
`bitune CMD: error: ...` line that names the file or setting at fault, and no traceback.
"""

from __future__ import annotations

import collections
import json
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import LoraConfig
from tiny_models import tiny_model
from training.test_training import make_base, settings
from transformers import BertConfig, BertModel

from bitune import BituneModel
from bitune.cli import main
from bitune.core.checkpoint import CONFIG_FILE, MIXER_FILE
from bitune.core.loading import load_tokenizer
from bitune.training import TrainConfig, train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The good things the bad inputs are made from: a tiny model and data, a checkpoint, a run, task data."""
    root = make_base(tmp_path_factory.mktemp("world"))
    model, data = root / "model", root / "train.jsonl"
    checkpoint = root / "checkpoint"
    BituneModel.from_base(str(model), LoraConfig(r=2, target_modules=".*_proj")).save_pretrained(
        checkpoint, tokenizer=load_tokenizer(model)
    )
    run = root / "run"
    train(TrainConfig.from_dict(settings(root, run, training={"max_steps": 2, "save_steps": 1})))
    tokenizer_files = [model / name for name in ("tokenizer.json", "tokenizer_config.json")]

    def with_tokenizer(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        for file in tokenizer_files:
            shutil.copy(file, folder)
        return folder

    bert = root / "bert"
    BertModel(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(bert)
    with_tokenizer(bert)
    other_shape = root / "other-shape"
    tiny_model("llama", hidden_size=64).save_pretrained(other_shape)
    with_tokenizer(other_shape)
    pickled = with_tokenizer(root / "pickled")
    shutil.copy(model / "config.json", pickled)
    torch.save(tiny_model("llama").state_dict(), pickled / "pytorch_model.bin")
    no_weights = with_tokenizer(root / "no-weights")
    shutil.copy(model / "config.json", no_weights)
    rows = [{"question": f"{a} + 1?", "choices": [str(a), str(a + 1)], "answer": 1} for a in range(3)]
    (root / "quiz.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "long_answer.jsonl").write_text(
        json.dumps({"question": "hi", "choices": ["a", "b " * 400], "answer": 0}) + "\n"
    )
    return SimpleNamespace(
        root=root, model=model, data=data, checkpoint=checkpoint, run=run, bert=bert, other_shape=other_shape,
        pickled=pickled, no_weights=no_weights,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- makers


def config(w: SimpleNamespace, tmp: Path, text: str | None = None, **sections) -> str:
    """A training config file for a fresh run into tmp/out (`sections` merged into the small fast run)."""
    path = tmp / "run.yaml"
    raw = settings(w.root, tmp / "out", **sections)
    path.write_text(text if text is not None else yaml.safe_dump(raw))
    return str(path)


def train_with(*overrides: str, **sections) -> Callable[[SimpleNamespace, Path], list[str]]:
    return lambda w, tmp: ["train", config(w, tmp, **sections), *overrides]


def raw_config(text: str) -> Callable[[SimpleNamespace, Path], list[str]]:
    def make(w: SimpleNamespace, tmp: Path) -> list[str]:
        path = tmp / "run.yaml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return ["train", str(path)]

    return make


def valid_yaml(w: SimpleNamespace, tmp: Path) -> str:
    return yaml.safe_dump(settings(w.root, tmp / "out"))


def data_file(
    content: str | bytes, name: str = "data.jsonl", **data
) -> Callable[[SimpleNamespace, Path], list[str]]:
    def make(w: SimpleNamespace, tmp: Path) -> list[str]:
        (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return ["train", config(w, tmp, data={"path": str(tmp / name), "max_length": 64, **data})]

    return make


def resumed_run(edit: Callable[[Path], None], *overrides: str):
    """Resume a copy of the trained run from its checkpoint-1 (edited by `edit`) with `overrides`."""

    def make(w: SimpleNamespace, tmp: Path) -> list[str]:
        run = tmp / "out"
        shutil.copytree(w.run, run)
        shutil.rmtree(run / "final")
        shutil.rmtree(run / "checkpoint-2")
        edit(run / "checkpoint-1")
        return ["train", config(w, tmp, training={"max_steps": 2, "save_steps": 1}), *overrides]

    return make


def generate(*options: str, checkpoint: Callable[[SimpleNamespace, Path], Path] | None = None):
    def make(w: SimpleNamespace, tmp: Path) -> list[str]:
        folder = checkpoint(w, tmp) if checkpoint else w.checkpoint
        return [
            "generate",
            "--checkpoint",
            str(folder),
            "--device",
            "cpu",
            "--prompt",
            "what is 1+1?",
            *options,
        ]

    return make


def damaged(edit: Callable[[Path], None]) -> Callable[[SimpleNamespace, Path], Path]:
    """A copy of the checkpoint, damaged by `edit`."""

    def make(w: SimpleNamespace, tmp: Path) -> Path:
        folder = tmp / "checkpoint"
        shutil.copytree(w.checkpoint, folder)
        edit(folder)
        return folder

    return make


def set_config(**fields) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / CONFIG_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return edit


def junk(name: str, content: bytes = b"junk") -> Callable[[Path], None]:
    """Replace a weight file with junk, in a checkpoint without checksums (as older versions wrote them)."""

    def edit(folder: Path) -> None:
        (folder / name).write_bytes(content)
        set_config(sha256={})(folder)

    return edit


def flip_a_bit(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[-7] ^= 0x10
        (folder / name).write_bytes(bytes(data))

    return edit


def nan_mixer(w: SimpleNamespace, tmp: Path) -> Path:
    """A checkpoint saved with NaN mixing coefficients (its checksums match: the values themselves are bad)."""
    model = BituneModel.from_pretrained(w.checkpoint)
    with torch.no_grad():
        model.mixer.keys.fill_(float("nan"))
    return model.save_pretrained(tmp / "checkpoint", tokenizer=load_tokenizer(w.model))


def moved_base(w: SimpleNamespace, tmp: Path) -> Path:
    """A checkpoint whose recorded base model folder is gone."""
    base = tmp / "base"
    shutil.copytree(w.model, base)
    model = BituneModel.from_base(str(base), LoraConfig(r=2, target_modules=".*_proj"))
    model.save_pretrained(tmp / "checkpoint", tokenizer=load_tokenizer(base))
    shutil.rmtree(base)
    return tmp / "checkpoint"


def export_into(where: Callable[[SimpleNamespace, Path], Path]):
    def make(w: SimpleNamespace, tmp: Path) -> list[str]:
        checkpoint = tmp / "checkpoint"
        shutil.copytree(w.checkpoint, checkpoint)
        return [
            "export",
            "--checkpoint",
            str(checkpoint),
            str(where(SimpleNamespace(checkpoint=checkpoint), tmp)),
        ]

    return make


def non_empty(w: SimpleNamespace, tmp: Path) -> Path:
    (tmp / "served").mkdir()
    (tmp / "served" / "notes.txt").write_text("keep me")
    return tmp / "served"


def task(spec: str | bytes, *options: str, name: str = "quiz.yaml"):
    def make(w: SimpleNamespace, tmp: Path) -> list[str]:
        path = tmp / name
        if spec == "folder":
            path.mkdir()
        else:
            path.write_bytes(spec if isinstance(spec, bytes) else spec.replace("DATA", str(w.root)).encode())
        out = str(tmp / "scores.json")
        return ["eval", "--checkpoint", str(w.checkpoint), "--device", "cpu", "--tasks", str(path), "--output", out, *options]  # fmt: skip

    return make


def held(make_argv: Callable[[SimpleNamespace, Path], list[str]]):
    """`make_argv`, run while another process holds the run's output folder."""

    def make(w: SimpleNamespace, tmp: Path) -> list[str]:
        argv = make_argv(w, tmp)
        (tmp / "out").mkdir(exist_ok=True)
        code = (  # what bitune.files.lock_folder does, without the slow import of bitune
            "import fcntl, os, time\n"
            f"lock = open({str(tmp / 'out' / '.bitune.lock')!r}, 'a+')\n"
            "fcntl.flock(lock, fcntl.LOCK_EX)\n"
            "lock.write(f'process {os.getpid()} on a test machine'); lock.flush()\n"
            "print('locked', flush=True); time.sleep(60)\n"
        )
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        make.holders.append(holder)
        return argv

    make.holders = []
    return make


SPEC = "data: DATA/quiz.jsonl\nquestion: question\nchoices: choices\nanswer: answer\n"
PICKLE = pickle.dumps(
    collections.Counter(a=1)
)  # not a plain tensor: torch.load(weights_only=True) refuses it

# id -> (argv maker, texts the error line must contain)
CASES: dict[str, tuple[Callable[[SimpleNamespace, Path], list[str]], list[str]]] = {
    # --- config files
    "config missing": (lambda w, tmp: ["train", str(tmp / "nope.yaml")], ["nope.yaml: no such config file"]),
    "config is a folder": (lambda w, tmp: ["train", str(tmp)], ["is a folder, not a config file"]),
    "config not UTF-8": (raw_config(b"model: caf\xe9\n"), ["run.yaml: not UTF-8 text"]),
    "config not YAML": (raw_config("model: [a\n"), ["run.yaml: not valid YAML"]),
    "config a list": (raw_config("- model\n"), ["run.yaml: expected a mapping"]),
    "config tabs": (raw_config("model:\n\t- a\n"), ["run.yaml: not valid YAML"]),
    "duplicate key": (raw_config("model: a\nmodel: b\n"), ["run.yaml, line 2: key 'model' is given twice"]),
    "duplicate section": (
        lambda w, tmp: ["train", config(w, tmp, text=valid_yaml(w, tmp) + "training: {max_steps: 3}\n")],
        ["key 'training' is given twice"],
    ),
    "duplicate nested key": (
        raw_config("model: m\ntraining:\n  max_steps: 1\n  max_steps: 2\n"),
        ["line 4: key 'max_steps' is given twice"],
    ),
    "unknown section": (train_with(optimizer={"lr": 1}), ["unknown key 'optimizer'"]),
    "unknown key": (train_with(training={"max_step": 3}), ["unknown key 'training.max_step'"]),
    "override syntax": (train_with("training.max_steps", "3"), ["expected --key value"]),
    "override unknown": (train_with("--training.lr", "1"), ["--training.lr", "unknown key 'lr'"]),
    "ill-typed": (train_with("--training.max_steps", "many"), ["training.max_steps must be an integer"]),
    # --- settings
    "lr zero": (train_with("--training.learning_rate", "0"), ["training.learning_rate must be a positive"]),
    "lr negative": (train_with("--training.learning_rate", "-1e-3"), ["training.learning_rate"]),
    "lr NaN": (train_with("--training.learning_rate", "nan"), ["training.learning_rate", "nan"]),
    "lr infinite": (train_with(training={"learning_rate": float("inf")}), ["training.learning_rate", "inf"]),
    "max_grad_norm -1": (train_with("--training.max_grad_norm", "-1"), ["training.max_grad_norm"]),
    "weight_decay < 0": (train_with("--training.weight_decay", "-0.1"), ["training.weight_decay"]),
    "adam_beta1 1": (train_with("--training.adam_beta1", "1"), ["training.adam_beta1"]),
    "adam_epsilon 0": (train_with("--training.adam_epsilon", "0"), ["training.adam_epsilon"]),
    "warmup_ratio 1.5": (train_with("--training.warmup_ratio", "1.5"), ["training.warmup_ratio"]),
    "max_steps 0": (train_with("--training.max_steps", "0"), ["training.max_steps must be at least 1"]),
    "batch_size 0": (train_with("--training.batch_size", "0"), ["training.batch_size must be at least 1"]),
    "save_total_limit 0": (train_with("--training.save_total_limit", "0"), ["training.save_total_limit"]),
    "unknown schedule": (train_with("--training.lr_scheduler_type", "cosin"), ["training.lr_scheduler_type"]),
    "unknown precision": (train_with("--training.precision", "fp8"), ["training.precision 'fp8'"]),
    "unknown trainer arg": (
        train_with(training={"trainer_args": {"fast": True}}),
        ["training.trainer_args.fast"],
    ),
    "best model at end": (
        train_with(training={"trainer_args": {"load_best_model_at_end": True}}),
        ["load_best_model_at_end"],
    ),
    "eval without data": (train_with("--training.eval_steps", "1"), ["training.eval_steps"]),
    "peft kind": (train_with("--peft.kind", "lorra"), ["peft.kind 'lorra'"]),
    "peft r 0": (train_with("--peft.r", "0"), ["peft.r must be at least 1"]),
    "peft alpha 0": (train_with("--peft.alpha", "0"), ["peft.alpha"]),
    "peft dropout 1": (train_with("--peft.dropout", "1"), ["peft.dropout"]),
    "target regex": (
        train_with("--peft.target_modules", "(q_proj"),
        ["peft.target_modules", "regular expression"],
    ),
    "target nothing": (
        train_with("--peft.target_modules", "nothing_here"),
        ["peft.target_modules 'nothing_here'"],
    ),
    "feedforward for lora": (
        train_with("--peft.feedforward_modules", "[down_proj]"),
        ["peft.feedforward_modules"],
    ),
    "bitune mode": (train_with("--bitune.mode", "bidir"), ["bitune.mode must be one of"]),
    "bitune c 0": (train_with("--bitune.c", "0"), ["c must be positive"]),
    "device": (train_with("--device", "tpu"), ["device 'tpu'"]),
    "output_dir missing": (raw_config("model: m\ndata: d.jsonl\n"), ["output_dir is required"]),
    "output_dir a file": (
        lambda w, tmp: ["train", config(w, tmp), "--output_dir", str(w.data)],
        ["output_dir", "is a file"],
    ),
    "model missing": (raw_config("data: d.jsonl\noutput_dir: o\n"), ["model.name_or_path is required"]),
    "model.dtype": (train_with("--model.dtype", "float64"), ["model.dtype 'float64'"]),
    "validation both": (train_with(validation={"path": "v.jsonl", "size": 2}), ["validation: set either"]),
    "validation all": (train_with("--validation.size", "25"), ["leaves none to train on"]),
    # --- models
    "model path gone": (
        train_with("--model", "./no/such/model"),
        ["'./no/such/model': no such file or folder"],
    ),
    "model no weights": (
        lambda w, tmp: ["train", config(w, tmp), "--model", str(w.no_weights)],
        ["no-weights"],
    ),
    "model pickles only": (
        lambda w, tmp: ["train", config(w, tmp), "--model", str(w.pickled)],
        ["pickled", "pickle files only"],
    ),
    "encoder model": (
        lambda w, tmp: ["train", config(w, tmp), "--model", str(w.bert)],
        ["model.name_or_path", "decoder-only causal LM"],
    ),
    "max_length > positions": (
        train_with("--data.max_length", "1000"),
        ["data.max_length 1000", "128 positions"],
    ),
    # --- data files (the kinds tests/data/test_samples.py checks one by one)
    "data missing": (train_with("--data", "./no/such.jsonl"), ["no/such.jsonl", "no such file"]),
    "data bad JSON line": (
        data_file('{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
        ["data.jsonl", "line 2"],
    ),
    "data field missing": (data_file('{"prompt": "what is 1+1?"}\n'), ["data.jsonl", "line 1"]),
    "data not UTF-8": (data_file(b'{"prompt": "\xff", "completion": "2"}\n'), ["data.jsonl"]),
    "data all empty": (data_file('{"prompt": "what is 1+1?", "completion": ""}\n'), ["data.jsonl", "empty"]),
    "data format": (train_with("--data.format", "xml"), ["'format'", "'xml'"]),
    "data template": (train_with("--data.template", "llama"), ["'template'", "'llama'"]),
    "data max_length 2": (train_with("--data.max_length", "2"), ["'max_length'"]),
    "data overlong": (train_with("--data.overlong", "cut"), ["'overlong'"]),
    # --- resume
    "fresh run into a run": (
        lambda w, tmp: shutil.copytree(w.run, tmp / "out") and ["train", config(w, tmp)],
        ["already holds a run", "resume_from_checkpoint latest"],
    ),
    "resume not a checkpoint": (
        train_with("--training.resume_from_checkpoint", "/no/such/checkpoint-3"),
        ["training.resume_from_checkpoint", "not a training checkpoint"],
    ),
    "resume changed lr": (
        resumed_run(
            lambda c: None, "--training.learning_rate", "0.002", "--training.resume_from_checkpoint", "latest"
        ),
        ["training.learning_rate 0.001 -> 0.002", "force_resume"],
    ),
    "resume without record": (
        resumed_run(
            lambda c: (c / "bitune_run.json").unlink(), "--training.resume_from_checkpoint", "latest"
        ),
        ["checkpoint-1 has no bitune_run.json", "force_resume"],
    ),
    "resume damaged state": (
        resumed_run(
            lambda c: (c / "trainer_state.json").write_text("{"),
            "--training.resume_from_checkpoint",
            "latest",
        ),
        ["trainer_state.json: cannot be read"],
    ),
    "resume refused pickle": (
        resumed_run(
            lambda c: (c / "optimizer.pt").write_bytes(PICKLE), "--training.resume_from_checkpoint", "latest"
        ),
        ["checkpoint-1: its optimizer, scheduler or RNG state cannot be read"],
    ),
    "resume corrupt adapter": (
        resumed_run(
            flip_a_bit("causal/adapter_model.safetensors"), "--training.resume_from_checkpoint", "latest"
        ),
        ["causal/adapter_model.safetensors: the file is corrupt"],
    ),
    "output_dir in use": (held(train_with()), ["is in use by another run (process"]),
    # --- checkpoints
    "checkpoint missing": (
        generate(checkpoint=lambda w, tmp: tmp / "nope"),
        ["nope: no such checkpoint folder"],
    ),
    "not a checkpoint": (generate(checkpoint=lambda w, tmp: w.model), ["is not a Bitune checkpoint"]),
    "config not JSON": (
        generate(checkpoint=damaged(lambda c: (c / CONFIG_FILE).write_text("{"))),
        ["bitune_config.json: not valid JSON"],
    ),
    "format_version text": (
        generate(checkpoint=damaged(set_config(format_version="x"))),
        ["'format_version'"],
    ),
    "format_version new": (
        generate(checkpoint=damaged(set_config(format_version=99))),
        ["format version 99 is newer"],
    ),
    "num_layers": (generate(checkpoint=damaged(set_config(num_layers=5))), ["with 5 layers", "has 2"]),
    "adapters": (generate(checkpoint=damaged(set_config(adapters=["weird"]))), ["'adapters'"]),
    "bitune settings": (generate(checkpoint=damaged(set_config(bitune={"mode": "x"}))), ["field 'bitune'"]),
    "corrupt adapter": (
        generate(checkpoint=damaged(junk("causal/adapter_model.safetensors"))),
        ["causal/adapter_model.safetensors: not a readable safetensors file"],
    ),
    "corrupt mixer": (
        generate(checkpoint=damaged(junk(MIXER_FILE, b"\x08" + bytes(20)))),
        [f"{MIXER_FILE}: not a readable safetensors file"],
    ),
    "missing mixer": (
        generate(checkpoint=damaged(lambda c: (c / MIXER_FILE).unlink())),
        [f"{MIXER_FILE}: missing"],
    ),
    "missing adapter": (
        generate(checkpoint=damaged(lambda c: (c / "bidir/adapter_model.safetensors").unlink())),
        ["bidir: adapter_model.safetensors is missing"],
    ),
    "bit-flipped adapter": (
        generate(checkpoint=damaged(flip_a_bit("causal/adapter_model.safetensors"))),
        ["causal/adapter_model.safetensors: the file is corrupt"],
    ),
    "bit-flipped mixer": (
        generate(checkpoint=damaged(flip_a_bit(MIXER_FILE))),
        [f"{MIXER_FILE}: the file is corrupt"],
    ),
    "NaN mixer": (generate(checkpoint=nan_mixer), [f"{MIXER_FILE}: keys holds NaN"]),
    "base of other shape": (
        lambda w, tmp: generate("--base-model", str(w.other_shape))(w, tmp),
        ["its adapters do not fit the base model", "other-shape"],
    ),
    "base model gone": (generate(checkpoint=moved_base), ["the base model", "is gone", "--base-model"]),
    # --- decoding
    "max-new-tokens -1": (generate("--max-new-tokens", "-1"), ["max_new_tokens (--max-new-tokens)", "-1"]),
    "max-new-tokens 0": (generate("--max-new-tokens", "0"), ["max_new_tokens (--max-new-tokens)", "got 0"]),
    "temperature 0": (generate("--do-sample", "--temperature", "0"), ["temperature (--temperature)"]),
    "top-p 2": (generate("--do-sample", "--top-p", "2"), ["top_p (--top-p)"]),
    "prompt too long": (generate("--prompt", "x " * 100), ["the prompt is", "128 positions"]),
    # --- export
    "export non-empty": (export_into(non_empty), ["served", "not empty", "--overwrite"]),
    "export checkpoint": (export_into(lambda c, tmp: c.checkpoint), ["the export reads from"]),
    "export inside checkpoint": (
        export_into(lambda c, tmp: c.checkpoint / "causal"),
        ["the export reads from"],
    ),
    "export holding checkpoint": (export_into(lambda c, tmp: tmp), ["the export reads from"]),
    "export a file": (export_into(lambda c, tmp: (tmp / "f").write_text("x") and tmp / "f"), ["is a file"]),
    # --- task specs
    "spec not UTF-8": (task(b"data: caf\xe9\n"), ["quiz.yaml: not UTF-8 text"]),
    "spec a folder": (task("folder"), ["quiz.yaml: is a folder"]),
    "spec not YAML": (task("data: [\n"), ["quiz.yaml: not valid YAML"]),
    "spec duplicate key": (
        task(SPEC + "answer: label\n"),
        ["quiz.yaml, line 5: key 'answer' is given twice"],
    ),
    "spec unknown key": (task(SPEC + "choise: x\n"), ["quiz.yaml, key 'choise'"]),
    "spec no data": (task(SPEC.replace("quiz.jsonl", "nope.jsonl")), ["nope.jsonl"]),
    "spec huge field": (
        task(SPEC.replace("quiz.jsonl", "long_answer.jsonl")),
        ["continuation of", "128-token window"],
    ),
    "eval limit": (task(SPEC, "--limit", "-1"), ["limit"]),
}


@pytest.mark.parametrize(("make_argv", "expected"), CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_naming_it(world, tmp_path, capsys, make_argv, expected) -> None:
    argv = make_argv(world, tmp_path)
    try:
        code = main(argv)
    finally:
        for holder in getattr(make_argv, "holders", []):
            holder.kill()
            holder.wait()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"bitune {argv[0]}: error: ")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]


def test_the_table_covers_every_kind(world) -> None:
    assert len(CASES) >= 60


def test_the_console_script_gives_the_same_one_line(world, tmp_path) -> None:
    """Spot check outside the test process: the installed `bitune` entry point, exit code 2, no traceback."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings(world.root, tmp_path / "out", training={"learning_rate": -1})))
    started = time.time()
    process = subprocess.run(
        [sys.executable, "-m", "bitune", "train", str(path)], capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 2 and "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("bitune train: error: ")
    assert "training.learning_rate must be a positive number, got -1.0" in process.stderr
    assert time.time() - started < 120
