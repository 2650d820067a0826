"""The stages of an experiment: the training data and the base model every cell shares, built once.

Each stage is a folder of the experiment (`bitune.experiments.layout`: DATA_DIR, BASE_MODEL_DIR) that appears
in one rename with its settings recorded in STAGE_FILE; a later run reuses it, and refuses it when the
experiment file now asks for other settings.

* `synthetic`: train.jsonl and test.jsonl from `bitune.experiments.synthetic.make_qa_dataset`;
* `ultrafeedback`: train.jsonl from UltraFeedback's answers of one model (the paper's instruction data);
* `pretrain`: a small Llama pretrained from scratch on synthetic stories;
* `llama2c`: a llama2.c checkpoint converted to a Hugging Face model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

from bitune.core.convert import convert_llama2c
from bitune.core.loading import resolve_device
from bitune.data.records import load_records
from bitune.errors import BituneInputError
from bitune.experiments import synthetic
from bitune.experiments.layout import (
    BASE_MODEL_DIR,
    DATA_DIR,
    PRETRAIN_LOG_FILE,
    STAGE_FILE,
    TEST_DATA_FILE,
    TRAIN_DATA_FILE,
)
from bitune.experiments.settings import Experiment, PretrainSettings, SyntheticSettings, UltraFeedbackSettings
from bitune.files import atomic_directory, atomic_write_json, atomic_write_text
from bitune.settings import changed_keys, plain


def _build_stage(folder: Path, settings: dict[str, Any], build: Callable[[Path], None]) -> None:
    """Build `folder` once, in one rename, with its settings recorded; refuse a folder built differently."""
    settings = plain(settings)
    if folder.exists():
        marker = folder / STAGE_FILE
        recorded = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        if recorded != settings:
            changed = (
                ", ".join(changed_keys(recorded, settings)) if recorded is not None else "unknown settings"
            )
            raise BituneInputError(
                f"{folder} was built with other settings ({changed}); delete it (and the cells trained on it) "
                "to rebuild, or choose another output_dir"
            )
        return
    with atomic_directory(folder) as staging:
        build(staging)
        atomic_write_json(staging / STAGE_FILE, settings)


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_synthetic_data(settings: SyntheticSettings, folder: Path) -> None:
    """train.jsonl and test.jsonl rows {prompt, completion, task} from `bitune.experiments.synthetic.make_qa_dataset`."""
    data = synthetic.make_qa_dataset(settings.task_types, settings.n_train, settings.n_test, settings.seed)
    files = {"train": TRAIN_DATA_FILE, "test": TEST_DATA_FILE}
    for split, rows in data.items():
        atomic_write_text(folder / files[split], _jsonl(rows))


def ultrafeedback_rows(settings: UltraFeedbackSettings) -> list[dict[str, str]]:
    """Prompt/completion rows: each UltraFeedback instruction with the first completion by `settings.model`.

    Example (a local file in UltraFeedback's schema; `UltraFeedbackSettings()` reads the hub data set):
        >>> import json
        >>> from bitune.experiments.settings import UltraFeedbackSettings
        >>> row = {"instruction": "Name a colour.", "completions": [
        ...     {"model": "falcon-40b", "response": "Red."}, {"model": "gpt-4", "response": "Blue."}]}
        >>> _ = (tmp / "ultrafeedback.jsonl").write_text(json.dumps(row) + "\\n")
        >>> ultrafeedback_rows(UltraFeedbackSettings(path=str(tmp / "ultrafeedback.jsonl")))
        [{'prompt': 'Name a colour.', 'completion': 'Blue.'}]
    """
    rows = []
    for record in load_records(settings.path, settings.split):
        instruction, completions = record.fields.get("instruction"), record.fields.get("completions")
        if not isinstance(instruction, str) or not isinstance(completions, list):
            raise BituneInputError(
                f"{record.location}: expected UltraFeedback's fields 'instruction' (text) and 'completions' (a "
                "list); point ultrafeedback.path to UltraFeedback or a file in its schema"
            )
        answer = next(
            (
                c.get("response")
                for c in completions
                if isinstance(c, Mapping) and c.get("model") == settings.model
            ),
            None,
        )
        if isinstance(answer, str) and answer.strip() and instruction.strip():
            rows.append({"prompt": instruction, "completion": answer})
    if not rows:
        raise BituneInputError(
            f"{settings.path}: no completion is by model {settings.model!r}; check ultrafeedback.model"
        )
    return rows


def pretrain_base_model(settings: PretrainSettings, folder: Path, device: torch.device | str = "cpu") -> None:
    """Pretrain a small Llama from scratch on `make_pretraining_corpus` stories; save it and its tokenizer.

    Plain AdamW with warmup and cosine decay, batches of whole stories drawn at random; the loss every 50
    steps goes to `pretrain_metrics.jsonl`.

    Example (a token run: 2 steps on 20 stories):
        >>> from bitune.experiments.settings import PretrainSettings
        >>> pretrain_base_model(PretrainSettings(stories=20, steps=2, batch_size=4), tmp / "tiny-base")
        >>> sorted(path.name for path in (tmp / "tiny-base").iterdir())
        ['config.json', 'generation_config.json', 'model.safetensors', 'pretrain_metrics.jsonl',
         'tokenizer.json', 'tokenizer_config.json']
    """
    tokenizer = synthetic.build_tokenizer()
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(synthetic.pretrain_config(len(tokenizer), **settings.model)).to(device).train()
    stories = [
        ids + [tokenizer.eos_token_id]
        for ids in tokenizer(synthetic.make_pretraining_corpus(settings.stories, settings.seed))["input_ids"]
    ]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    schedule = get_cosine_schedule_with_warmup(
        optimizer, min(settings.warmup_steps, settings.steps), settings.steps
    )
    generator = torch.Generator().manual_seed(settings.seed)
    log = []
    for step in tqdm(range(1, settings.steps + 1), desc="pretraining", unit="step"):
        chosen = torch.randint(len(stories), (settings.batch_size,), generator=generator).tolist()
        batch = tokenizer.pad({"input_ids": [stories[i] for i in chosen]}, return_tensors="pt").to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == settings.steps:
            log.append({"step": step, "loss": loss.item()})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder / PRETRAIN_LOG_FILE, _jsonl(log))


def prepare_stages(experiment: Experiment) -> None:
    """Make the training data and the base model the stages describe (once; later runs reuse them)."""
    root = experiment.root
    if experiment.synthetic is not None:
        settings = experiment.synthetic
        _build_stage(
            root / DATA_DIR, {"synthetic": asdict(settings)}, lambda f: write_synthetic_data(settings, f)
        )
    if experiment.ultrafeedback is not None:
        settings = experiment.ultrafeedback
        _build_stage(
            root / DATA_DIR,
            {"ultrafeedback": asdict(settings)},
            lambda f: atomic_write_text(f / TRAIN_DATA_FILE, _jsonl(ultrafeedback_rows(settings))),
        )
    if experiment.pretrain is not None:
        settings = experiment.pretrain
        device = resolve_device(experiment.train_config(experiment.cells()[0]).device)
        _build_stage(
            root / BASE_MODEL_DIR,
            {"pretrain": asdict(settings)},
            lambda f: pretrain_base_model(settings, f, device),
        )
    if experiment.llama2c is not None:
        settings = experiment.llama2c
        _build_stage(
            root / BASE_MODEL_DIR,
            {"llama2c": asdict(settings)},
            lambda f: convert_llama2c(settings.checkpoint, settings.tokenizer, f),
        )


__all__ = ["prepare_stages", "pretrain_base_model", "ultrafeedback_rows", "write_synthetic_data"]
