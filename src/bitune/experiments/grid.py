"""Check the paper's claim on your own model and data: a grid of runs, trained and evaluated alike.

    bitune experiment configs/experiments/cpu_synthetic.yaml     # runs the grid, then writes the report
    bitune report runs/experiments/cpu-synthetic                 # the report again (bitune.experiments.report)

An experiment file (paths are relative to the working directory, as in training configs):

    base: configs/experiments/cpu_synthetic.yaml   # optional: start from another experiment file, whose
                                             #   keys the ones below replace (nested sections key by key;
                                             #   `pretrain: null` drops a section)
    output_dir: runs/experiments/mine
    train:                                   # the training config of every cell (keys of configs/paper_lora.yaml)
      base: configs/paper_lora.yaml          #   optional: start from this file; the keys below replace its keys
      model: meta-llama/Llama-3.2-1B
      training: {max_steps: 1000}
    grid:                                    # every method x PEFT kind x seed is one cell
      methods: [baseline, bitune, naive_bidir, no_mixing, only_causal, shared_weights]
      peft: [lora, dora, {kind: ia3, target_modules: null}]    # a kind, or peft settings that name one
      seeds: [42, 43, 44]
    evaluation:
      tasks: [piqa, {name: mmlu, limit: 1000, metric: acc_norm}, my_quiz.yaml]
      data_dir: ../shared/data               # built-in tasks from <dir>/<task>/<split>.jsonl (null: the hub)
      style: full                            # the paper's prompts (plain: lm-eval's)
      batch_size: 16

Optional stages, run once per experiment and kept in output_dir (a changed stage setting is an error, not a
silent rebuild):

    synthetic: {task_types: [...], n_train: 4000, n_test: 300}   # training data + held-out questions from
                                  # bitune.experiments.synthetic; evaluation task "synthetic" scores the held-out questions
                                  # (one task per type): exact match of the greedy answer, and acc/acc_norm of
                                  # the answer's log-likelihood among all answers of its type
    ultrafeedback: {}             # the paper's instruction data: UltraFeedback's GPT-4 answers
    pretrain: {stories: 20000, steps: 1500}   # pretrain a small Llama from scratch on synthetic stories
    llama2c: {checkpoint: stories260K.bin, tokenizer: tok512.bin}    # or convert a llama2.c model

The grid sets `bitune.mode`, `peft` (kind and settings), `training.seed` and `output_dir` of every cell; the
stages set `data.path` and `model.name_or_path`; everything else is the same for all cells. A cell is
`output_dir/cells/<method>-<peft>-seed<seed>/`: the training run (checkpoints, `final/`, `metrics.jsonl`),
`eval.json` (scores, per-item scores, the final mixing coefficients) and `done.json`, written last.
Rerunning skips done cells, continues an interrupted cell from its newest checkpoint, and re-evaluates done
cells whose evaluation settings changed. The untuned base model is scored once as a reference
(`evaluation.base_model`).
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

from bitune.cli.commands import DTYPES, _HelpFormatter, _resolve_device, load_for_inference
from bitune.core.batch import pad_left
from bitune.core.checkpoint import CONFIG_FILE as CHECKPOINT_CONFIG_FILE
from bitune.core.convert import convert_llama2c
from bitune.core.modes import MODES
from bitune.data.samples import DataConfig, Record, build_samples, load_records
from bitune.errors import BituneInputError
from bitune.evaluation.metrics import TaskResult, multiple_choice_scores, summarize
from bitune.evaluation.runner import evaluate
from bitune.evaluation.scoring import context_window, load_scoring_model, loglikelihoods
from bitune.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, STYLES, TASK_NAMES, Task, load_task
from bitune.experiments import synthetic
from bitune.experiments.report import (
    BASE_EVAL_FILE,
    CELLS_DIR,
    DONE_FILE,
    EVAL_FILE,
    EXPERIMENT_FILE,
    cell_name,
    write_report,
)
from bitune.files import atomic_directory, atomic_write_json, atomic_write_text
from bitune.training import TrainConfig, load_tokenizer, train
from bitune.training.config import PEFT_KINDS, _build, _expand_shorthands, read_config_file, read_yaml_mapping
from bitune.training.trainer import FINAL_DIR

DATA_DIR = "data"
BASE_MODEL_DIR = "base_model"
STAGE_FILE = "stage.json"  # inside a stage's folder: the settings it was built with
CELL_FILE = "cell.json"  # written when a cell starts: the settings it trains with
SYNTHETIC = "synthetic"  # the evaluation task name of the held-out synthetic questions
EXACT_MATCH = "exact_match"
METRICS = {MULTIPLE_CHOICE: ("acc", "acc_norm"), GENERATION: ("flexible_match", "strict_match")}
SYNTHETIC_METRICS = (EXACT_MATCH, "acc", "acc_norm")
SYNTHETIC_MAX_NEW_TOKENS = 8  # one-word answers


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class GridSettings:
    """The cells: every method x PEFT kind x seed. A `peft` entry is a kind or a mapping of peft settings."""

    methods: list[str]
    peft: list[str | dict[str, Any]]
    seeds: list[int]

    def __post_init__(self) -> None:
        for method in self.methods:
            if method not in MODES:
                raise BituneInputError(
                    f"grid.methods: {method!r} is not a method; use some of {', '.join(MODES)}"
                )
        self.peft = [{"kind": item} if isinstance(item, str) else dict(item) for item in self.peft]
        for item in self.peft:
            if item.get("kind") not in PEFT_KINDS:
                raise BituneInputError(
                    f"grid.peft: {item!r} names no PEFT kind; write one of {', '.join(PEFT_KINDS)}, or a mapping "
                    "of peft settings with kind: (e.g. {kind: ia3, target_modules: null})"
                )
        for name, values in (("methods", self.methods), ("peft", self.kinds), ("seeds", self.seeds)):
            if not values:
                raise BituneInputError(f"grid.{name} is empty; list at least one")
            if len(set(values)) < len(values):
                raise BituneInputError(f"grid.{name} lists an entry twice: {values}")

    @property
    def kinds(self) -> list[str]:
        return [item["kind"] for item in self.peft]


@dataclass
class SyntheticSettings:
    """Training rows and held-out questions from `bitune.experiments.synthetic.make_qa_dataset`."""

    task_types: list[str]
    n_train: int
    n_test: int
    seed: int = 0

    def __post_init__(self) -> None:
        for task_type in self.task_types:
            if task_type not in synthetic.TASK_TYPES:
                raise BituneInputError(
                    f"synthetic.task_types: {task_type!r} is unknown; use some of {', '.join(synthetic.TASK_TYPES)}"
                )
        if not self.task_types or self.n_train < 1 or self.n_test < len(self.task_types):
            raise BituneInputError(
                "synthetic: give task_types, n_train of at least 1 and n_test of at least one per task type"
            )


@dataclass
class UltraFeedbackSettings:
    """The paper's instruction data: per UltraFeedback prompt, the answer written by `model`."""

    path: str = "openbmb/UltraFeedback"  # hub dataset or local file in its schema
    split: str = "train"
    model: str = "gpt-4"


@dataclass
class PretrainSettings:
    """Pretraining a small Llama (`bitune.experiments.synthetic.pretrain_config`) from scratch on synthetic stories."""

    stories: int
    steps: int
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides, e.g. num_hidden_layers

    def __post_init__(self) -> None:
        for name in ("stories", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise BituneInputError(f"pretrain.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class Llama2cSettings:
    """A llama2.c checkpoint and tokenizer, converted to a Hugging Face model (`bitune.core.convert`)."""

    checkpoint: str
    tokenizer: str


@dataclass
class TaskSettings:
    """One evaluation task; unset fields take the `evaluation` section's value."""

    name: str
    data_dir: str | None = None
    path: str | None = None
    split: str | None = None
    style: str | None = None
    limit: int | None = None
    metric: str | None = None  # default: acc (multiple choice), flexible_match (generation), exact_match


@dataclass
class EvaluationSettings:
    """The tasks every cell is scored on, and how. A task entry is a name or a mapping of `TaskSettings`."""

    tasks: list[str | dict[str, Any]]
    data_dir: str | None = None
    style: str = "full"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None
    base_model: bool = True  # also score the untuned base model, once

    def __post_init__(self) -> None:
        if not self.tasks:
            raise BituneInputError("evaluation.tasks is empty; list at least one task")
        if self.style not in STYLES:
            raise BituneInputError(
                f"evaluation.style {self.style!r} is unknown; use one of {', '.join(STYLES)}"
            )
        if self.batch_size < 1:
            raise BituneInputError(f"evaluation.batch_size must be at least 1, got {self.batch_size}")
        self.tasks = [self._entry(index, item) for index, item in enumerate(self.tasks)]

    def _entry(self, index: int, item: str | dict[str, Any] | TaskSettings) -> TaskSettings:
        if isinstance(item, TaskSettings):  # already parsed (dataclasses.replace)
            return item
        entry = _build(
            TaskSettings, {"name": item} if isinstance(item, str) else item, "", f"evaluation.tasks[{index}]"
        )
        for name in ("data_dir", "style", "limit"):  # unset: the section's value
            if getattr(entry, name) is None:
                setattr(entry, name, getattr(self, name))
        return entry


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    method: str
    peft: str
    seed: int

    @property
    def name(self) -> str:
        return cell_name(self.method, self.peft, self.seed)


@dataclass
class Experiment:
    """A parsed experiment file; `run_experiment` runs it.

    Example:
        >>> experiment = load_experiment("configs/experiments/cpu_synthetic.yaml")
        >>> len(experiment.cells()), experiment.cells()[0].name
        (18, 'baseline-lora-seed42')
    """

    output_dir: str
    train: str | dict[str, Any]
    grid: GridSettings
    evaluation: EvaluationSettings
    synthetic: SyntheticSettings | None = None
    ultrafeedback: UltraFeedbackSettings | None = None
    pretrain: PretrainSettings | None = None
    llama2c: Llama2cSettings | None = None
    source: str = "experiment"

    def __post_init__(self) -> None:
        if self.synthetic is not None and self.ultrafeedback is not None:
            raise BituneInputError("synthetic and ultrafeedback both make the training data; keep one")
        if self.pretrain is not None and self.llama2c is not None:
            raise BituneInputError("pretrain and llama2c both make the base model; keep one")
        if any(task.name == SYNTHETIC for task in self.evaluation.tasks) and not self.synthetic:
            raise BituneInputError(
                "evaluation.tasks: 'synthetic' needs a synthetic: section (the held-out questions)"
            )

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    def cells(self) -> list[Cell]:
        return [
            Cell(method, kind, seed)
            for kind in self.grid.kinds
            for method in self.grid.methods
            for seed in self.grid.seeds
        ]

    def cell_dir(self, cell: Cell) -> Path:
        return self.root / CELLS_DIR / cell.name

    def train_mapping(self) -> dict[str, Any]:
        """The training config shared by all cells, with its `base` file merged in."""
        train = {"base": self.train} if isinstance(self.train, str) else dict(self.train)
        base = train.pop("base", None)
        mapping = read_config_file(Path(base)) if base is not None else {}
        return _merged(mapping, _expand_shorthands(train))

    def train_config(self, cell: Cell) -> TrainConfig:
        """The training config of one cell: the shared one, plus what the stages and the grid set."""
        peft = next(item for item in self.grid.peft if item["kind"] == cell.peft)
        overrides: dict[str, Any] = {
            "bitune": {"mode": cell.method},
            "peft": peft,
            "training": {"seed": cell.seed, "resume_from_checkpoint": "latest"},
            "output_dir": str(self.cell_dir(cell)),
        }
        if self.synthetic is not None or self.ultrafeedback is not None:
            overrides["data"] = {
                "path": str(self.root / DATA_DIR / "train.jsonl"),
                "format": "prompt_completion",
            }
        if self.pretrain is not None or self.llama2c is not None:
            overrides["model"] = {"name_or_path": str(self.root / BASE_MODEL_DIR), "tokenizer": None}
        return TrainConfig.from_dict(
            _merged(self.train_mapping(), overrides), f"{self.source}: train (cell {cell.name})"
        )

    def stage_settings(self) -> dict[str, Any]:
        return {
            name: asdict(getattr(self, name))
            for name in ("synthetic", "ultrafeedback", "pretrain", "llama2c")
            if getattr(self, name) is not None
        }

    def training_fingerprint(self, cell: Cell) -> dict[str, Any]:
        """What a cell's training depends on (paths inside output_dir excluded, so the folder can move)."""
        peft = next(item for item in self.grid.peft if item["kind"] == cell.peft)
        return _plain(
            {
                "train": self.train_mapping(),
                "stages": self.stage_settings(),
                "method": cell.method,
                "peft": peft,
                "seed": cell.seed,
            }
        )

    def evaluation_fingerprint(self) -> dict[str, Any]:
        """What a cell's scores depend on, besides its model (batch size and the metric shown change no score)."""
        tasks = [asdict(task) | {"metric": None} for task in self.evaluation.tasks]
        return _plain({"tasks": tasks, "max_new_tokens": self.evaluation.max_new_tokens})


def load_experiment(path: str | Path, output_dir: str | Path | None = None) -> Experiment:
    """Read and check an experiment file: every cell's training config is built, so a bad key fails here.

    Raises `BituneInputError` naming the file and the key.

    Example:
        >>> load_experiment("configs/experiments/cpu_synthetic.yaml").grid.methods[:2]
        ['baseline', 'bitune']
    """
    path = Path(path)
    mapping, bases = _read_with_bases(path)
    if output_dir is not None:
        mapping["output_dir"] = str(output_dir)
    # A bad key may come from a base file: name them all.
    source = f"{path} (on top of {', '.join(map(str, bases))})" if bases else str(path)
    experiment = _build(Experiment, {**mapping, "source": source}, "", source)
    for cell in experiment.cells():
        experiment.train_config(cell)
    return experiment


def _read_with_bases(path: Path, including: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """An experiment file as a mapping with its `base:` file (and that one's base) merged in, and the base
    files it came from (nearest first). `including`: the files whose base this one is (to refuse cycles)."""
    mapping = read_yaml_mapping(path, "experiment file", "output_dir:, train:, grid:, ...")
    base = mapping.pop("base", None)
    if base is None:
        return mapping, []
    if not isinstance(base, str):
        raise BituneInputError(f"{path}: base must be the path of another experiment file, got {base!r}")
    including = (*including, path.resolve())
    if Path(base).resolve() in including:
        raise BituneInputError(f"{path}: base: {base} is this file or includes it (a cycle)")
    base_mapping, bases = _read_with_bases(Path(base), including)
    return _merged(base_mapping, mapping), [Path(base), *bases]


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested mappings are merged key by key."""
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def _plain(data: Any) -> Any:
    """JSON-equal data (tuples become lists), so a fingerprint compares equal to its saved copy."""
    return json.loads(json.dumps(data))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k
            for key in sorted(set(old) | set(new), key=str)
            for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------- stages


def _build_stage(folder: Path, settings: dict[str, Any], build: Callable[[Path], None]) -> None:
    """Build `folder` once, in one rename, with its settings recorded; refuse a folder built differently."""
    settings = _plain(settings)
    if folder.exists():
        marker = folder / STAGE_FILE
        recorded = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        if recorded != settings:
            changed = (
                ", ".join(_changed_keys(recorded, settings)) if recorded is not None else "unknown settings"
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
    for split, rows in data.items():
        atomic_write_text(folder / f"{split}.jsonl", _jsonl(rows))


def ultrafeedback_rows(settings: UltraFeedbackSettings) -> list[dict[str, str]]:
    """Prompt/completion rows: each UltraFeedback instruction with the first completion by `settings.model`.

    Example:
        >>> rows = ultrafeedback_rows(UltraFeedbackSettings())  # doctest: +SKIP (downloads the data set)
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

    Example:
        >>> pretrain_base_model(PretrainSettings(stories=200, steps=10), Path("runs/tiny-base"))  # doctest: +SKIP
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
    atomic_write_text(folder / "pretrain_metrics.jsonl", _jsonl(log))


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
            lambda f: atomic_write_text(f / "train.jsonl", _jsonl(ultrafeedback_rows(settings))),
        )
    if experiment.pretrain is not None:
        settings = experiment.pretrain
        device = _resolve_device(experiment.train_config(experiment.cells()[0]).device)
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


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class SyntheticTask:
    """Held-out synthetic questions of one type, scored two ways from the training tokenisation.

    * `exact_match`: the first word of the greedy answer is the answer (`bitune.experiments.synthetic.exact_match`);
    * `acc` / `acc_norm`: the answer (with its EOS, as trained) is the most likely of all answers this type of
      question has (a multiple-choice reading over the closed answer set, as the benchmarks are scored).
    """

    name: str
    rows: list[dict[str, str]]  # prompt, completion
    answers: list[str]  # every answer of this type in the training and test rows
    data: DataConfig  # the training data settings: prompts and answers are tokenised exactly as in training


@dataclass
class EvaluationTask:
    """A task and the metric the report shows for it."""

    task: Task | SyntheticTask
    metric: str

    @property
    def name(self) -> str:
        return self.task.name


def load_evaluation_tasks(experiment: Experiment) -> list[EvaluationTask]:
    """The tasks of `experiment.evaluation`, read once (the synthetic test set must exist: `prepare_stages`)."""
    tasks: list[EvaluationTask] = []
    for index, entry in enumerate(experiment.evaluation.tasks):
        key = f"{experiment.source}: evaluation.tasks[{index}]"
        if entry.name == SYNTHETIC:
            tasks += [
                EvaluationTask(task, _metric(entry, SYNTHETIC_METRICS, key))
                for task in _synthetic_tasks(experiment)
            ]
            continue
        if entry.name not in TASK_NAMES and not entry.name.endswith((".yaml", ".yml", ".json")):
            raise BituneInputError(
                f"{key}: unknown task {entry.name!r}; use {', '.join(TASK_NAMES)}, {SYNTHETIC}, or a task spec file"
            )
        task = load_task(
            entry.name,
            data_dir=entry.data_dir if entry.path is None else None,
            path=entry.path,
            split=entry.split,
            style=entry.style,
            limit=entry.limit,
        )
        tasks.append(EvaluationTask(task, _metric(entry, METRICS[task.kind], key)))
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise BituneInputError(f"{experiment.source}: evaluation.tasks: a task name occurs twice ({names})")
    return tasks


def _synthetic_tasks(experiment: Experiment) -> list[SyntheticTask]:
    """One task per question type of the held-out synthetic rows."""
    data = experiment.train_config(experiment.cells()[0]).data
    rows = {
        split: [
            json.loads(line)
            for line in (experiment.root / DATA_DIR / f"{split}.jsonl").read_text().splitlines()
        ]
        for split in ("train", "test")
    }
    tasks = []
    for task_type in experiment.synthetic.task_types:
        answers = sorted(
            {row["completion"] for split in rows.values() for row in split if row["task"] == task_type}
        )
        test = [row for row in rows["test"] if row["task"] == task_type]
        tasks.append(SyntheticTask(task_type, test, answers, data))
    return tasks


def _metric(entry: TaskSettings, available: Sequence[str], key: str) -> str:
    if entry.metric is None:
        return available[0]
    if entry.metric not in available:
        raise BituneInputError(
            f"{key}.metric: {entry.metric!r} is not a metric of {entry.name}; use {', '.join(available)}"
        )
    return entry.metric


def evaluate_model(
    model, tokenizer, tasks: Sequence[EvaluationTask], settings: EvaluationSettings
) -> dict[str, Any]:
    """Scores of `model` on `tasks`: per task its metrics (value, stderr, n) and every item's scores.

    Example:
        >>> scores = evaluate_model(model, tokenizer, tasks, experiment.evaluation)  # doctest: +SKIP
        >>> scores["arc_challenge"]["items"]["acc"][:3]  # doctest: +SKIP
        [1.0, 0.0, 0.0]
    """
    benchmarks = [task.task for task in tasks if isinstance(task.task, Task)]
    results: dict[str, tuple[TaskResult, list[dict[str, Any]]]] = {}
    if benchmarks:
        evaluation = evaluate(
            model,
            tokenizer,
            benchmarks,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            log_samples=True,
            progress=False,
        )
        for result in evaluation.results:
            results[result.task] = (result, evaluation.samples[result.task])
    for task in (task.task for task in tasks if isinstance(task.task, SyntheticTask)):
        results[task.name] = score_synthetic_task(
            model,
            tokenizer,
            task,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens or SYNTHETIC_MAX_NEW_TOKENS,
        )
    scores = {}
    for task in tasks:
        result, samples = results[task.name]
        scores[task.name] = {
            "metric": task.metric,
            "metrics": {
                name: {"value": e.value, "stderr": None if math.isnan(e.stderr) else e.stderr, "n": e.n}
                for name, e in result.metrics.items()
            },
            "items": {
                "id": [s["id"] for s in samples],
                **{name: [s[name] for s in samples] for name in result.metrics},
            },
        }
    return scores


def score_synthetic_task(
    model, tokenizer, task: SyntheticTask, *, batch_size: int, max_new_tokens: int
) -> tuple[TaskResult, list[dict[str, Any]]]:
    """`exact_match` of the greedy answers and `acc`/`acc_norm` over the answer set; with per-item scores."""
    records = [
        Record(f"{task.name} test question {index}", {"prompt": row["prompt"], "completion": answer})
        for index, row in enumerate(task.rows)
        for answer in task.answers
    ]
    # Truncated rather than dropped when too long, so that every question keeps all its options.
    samples, _ = build_samples(records, tokenizer, replace(task.data, overlong="truncate"))
    per_question = len(task.answers)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    likelihoods = loglikelihoods(
        model,
        [(sample.prompt_ids, sample.answer_ids) for sample in samples],
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        max_length=context_window(model.config, tokenizer),
        progress=False,
    )
    outputs = greedy_answers(
        model,
        tokenizer,
        [samples[index * per_question].prompt_ids for index in range(len(task.rows))],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    items = []
    for index, (row, output) in enumerate(zip(task.rows, outputs, strict=True)):
        options = likelihoods[index * per_question : (index + 1) * per_question]
        items.append(
            {
                "id": f"{task.name}-{index}",
                EXACT_MATCH: float(synthetic.exact_match(output, row["completion"])),
                **multiple_choice_scores(
                    [option.logprob for option in options],
                    task.answers,
                    task.answers.index(row["completion"]),
                ),
            }
        )
    scores = [{name: item[name] for name in SYNTHETIC_METRICS} for item in items]
    return summarize(task.name, scores), items


@torch.inference_mode()
def greedy_answers(
    model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations of prompt token lists (BOS first, as training sees them); generation ends at EOS."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = pad_left(prompts[start : start + batch_size], pad_token_id)
        prompt_ids = batch["input_ids"].to(model.device)
        generated = model.generate(
            prompt_ids,
            batch["attention_mask"].to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, prompt_ids.shape[1] :], skip_special_tokens=True)
    return outputs


def _free_accelerator_memory() -> None:
    """Return a released model's GPU memory now, not at the next garbage collection (cells run back to back)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def evaluate_base_model(experiment: Experiment, tasks: Sequence[EvaluationTask]) -> None:
    """Score the untuned base model once (`base_eval.json`), the reference row of the report."""
    config = experiment.train_config(experiment.cells()[0])
    fingerprint = _plain(
        {
            "model": config.model.name_or_path,
            "stages": experiment.stage_settings(),
            "evaluation": experiment.evaluation_fingerprint(),
        }
    )
    path = experiment.root / BASE_EVAL_FILE
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
        return
    model = load_scoring_model(config.model.name_or_path, dtype=DTYPES[config.base_dtype]).to(
        _resolve_device(config.device)
    )
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    scores = evaluate_model(model, tokenizer, tasks, experiment.evaluation)
    atomic_write_json(path, {"fingerprint": fingerprint, "tasks": scores})
    del model
    _free_accelerator_memory()
    tqdm.write(f"untuned base model: {_describe_scores(scores)}")


def _describe_scores(scores: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{name} {entry['metric']} {entry['metrics'][entry['metric']]['value']:.3f}"
        for name, entry in scores.items()
    )


# ---------------------------------------------------------------------------------------------- cells


def cell_state(experiment: Experiment, cell: Cell) -> str:
    """ "done", "started" (interrupted or being run) or "new"."""
    folder = experiment.cell_dir(cell)
    if (folder / DONE_FILE).is_file():
        return "done"
    return "started" if (folder / CELL_FILE).is_file() else "new"


def run_cell(experiment: Experiment, cell: Cell, tasks: Sequence[EvaluationTask]) -> str:
    """Train (or continue training) and evaluate one cell; returns what was done: skipped, evaluated or trained."""
    folder = experiment.cell_dir(cell)
    training = experiment.training_fingerprint(cell)
    evaluation = experiment.evaluation_fingerprint()
    if (folder / DONE_FILE).is_file():
        done = json.loads((folder / DONE_FILE).read_text(encoding="utf-8"))
        if done["training"] != training:
            raise BituneInputError(
                f"{folder} was trained with other settings ({', '.join(_changed_keys(done['training'], training))} "
                "changed); delete the folder to retrain it, or choose another output_dir"
            )
        if done["evaluation"] == evaluation:
            return "skipped"
        (folder / DONE_FILE).unlink()  # the scores are out of date: evaluate again
    elif (folder / CELL_FILE).is_file():
        started = json.loads((folder / CELL_FILE).read_text(encoding="utf-8"))
        if started["training"] != training:  # an unfinished run with other settings: start it over
            tqdm.write(f"{cell.name}: unfinished, with other settings; starting it over")
            shutil.rmtree(folder)
    atomic_write_json(folder / CELL_FILE, {"training": training})

    start = time.monotonic()
    config = experiment.train_config(cell)
    final = folder / FINAL_DIR
    trained = not (final / CHECKPOINT_CONFIG_FILE).is_file()
    if trained:
        train(config)  # continues from the newest checkpoint-N of an interrupted run
    model, tokenizer = load_for_inference(
        final, config.model.name_or_path, device=config.device, dtype=config.base_dtype
    )
    scores = evaluate_model(model, tokenizer, tasks, experiment.evaluation)
    atomic_write_json(folder / EVAL_FILE, {"cell": asdict(cell), "tasks": scores, "alphas": model.alphas()})
    del model
    _free_accelerator_memory()
    seconds = time.monotonic() - start
    atomic_write_json(
        folder / DONE_FILE, {"training": training, "evaluation": evaluation, "seconds": seconds}
    )
    tqdm.write(
        f"{cell.name}: {'trained and ' if trained else ''}evaluated in {seconds:.0f} s; {_describe_scores(scores)}"
    )
    return "trained" if trained else "evaluated"


def run_experiment(experiment: Experiment, only: Sequence[str] = ()) -> dict[str, str]:
    """Run the stages, the untuned reference and every (selected) cell; returns cell name -> what was done.

    `only`: shell patterns of cell names (e.g. "bitune-lora-*"); the other cells are left as they are.

    Example:
        >>> run_experiment(load_experiment("configs/experiments/cpu_synthetic.yaml"))  # doctest: +SKIP
        {'baseline-lora-seed42': 'trained', ...}
    """
    cells = [c for c in experiment.cells() if not only or any(fnmatch.fnmatch(c.name, p) for p in only)]
    if not cells:
        raise BituneInputError(
            f"--only {' '.join(only)}: no cell matches; cells are named like {experiment.cells()[0].name}"
        )
    prepare_stages(experiment)
    tasks = load_evaluation_tasks(experiment)
    _write_experiment_file(experiment, tasks)
    if experiment.evaluation.base_model:
        evaluate_base_model(experiment, tasks)
    outcome = {}
    for cell in tqdm(cells, desc="cells", unit="cell"):
        outcome[cell.name] = run_cell(experiment, cell, tasks)
    return outcome


def _write_experiment_file(experiment: Experiment, tasks: Sequence[EvaluationTask]) -> None:
    """experiment.json: what the report needs to know about the grid and the tasks."""
    config = experiment.train_config(experiment.cells()[0])
    training = config.training
    peft = ", ".join(
        f"{item['kind']}"
        + (f" (r={config.peft.r}, alpha={config.peft.alpha})" if item["kind"] != "ia3" else "")
        for item in experiment.grid.peft
    )
    summary = [  # (label, value) lines for the report's header, in this order
        ("base model", config.model.name_or_path),
        ("training data", config.data.path),
        (
            "steps × batch",
            f"{training.max_steps} × {training.batch_size * training.gradient_accumulation_steps}",
        ),
        (
            "learning rate",
            f"{training.learning_rate:g} ({training.lr_scheduler_type}, warmup {training.warmup_ratio:g})",
        ),
        ("PEFT", peft),
        ("evaluation", ", ".join(f"{task.name} ({task.metric})" for task in tasks)),
    ]
    atomic_write_json(
        experiment.root / EXPERIMENT_FILE,
        {
            "source": experiment.source,
            "grid": {
                "methods": experiment.grid.methods,
                "peft": experiment.grid.kinds,
                "seeds": experiment.grid.seeds,
            },
            "cells": [asdict(cell) | {"name": cell.name} for cell in experiment.cells()],
            "tasks": [{"name": task.name, "metric": task.metric} for task in tasks],
            "summary": summary,
        },
    )


# ---------------------------------------------------------------------------------------------- bitune experiment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpFormatter  # keeps the examples' line breaks
    parser.description = (
        "Run a grid of Bitune, baseline and ablation trainings (methods x PEFT kinds x seeds) with the same data, "
        "steps, learning rate and evaluation, then write the report (bitune report). Finished cells are skipped, "
        "so an interrupted experiment continues where it stopped."
    )
    parser.epilog = (
        "examples:\n  bitune experiment configs/experiments/cpu_synthetic.yaml\n"
        "  bitune experiment configs/experiments/paper_instruct.yaml --only 'bitune-lora-*' --only 'baseline-lora-*'"
    )
    parser.add_argument(
        "config", type=Path, metavar="CONFIG.yaml", help="the experiment file (see configs/experiments)"
    )
    parser.add_argument("--output-dir", type=Path, help="replace the file's output_dir")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only the cells whose name matches this shell pattern (e.g. 'bitune-lora-*'); repeatable",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def run(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.config, output_dir=args.output_dir)
    if args.dry_run:
        for cell in experiment.cells():
            print(f"{cell.name:40s} {cell_state(experiment, cell)}")
        return 0
    run_experiment(experiment, only=args.only)
    if not args.no_report:
        print(f"wrote {write_report(experiment.root)}")
    return 0


__all__ = [
    "Cell",
    "EvaluationSettings",
    "EvaluationTask",
    "Experiment",
    "GridSettings",
    "Llama2cSettings",
    "PretrainSettings",
    "SyntheticSettings",
    "SyntheticTask",
    "TaskSettings",
    "UltraFeedbackSettings",
    "cell_state",
    "evaluate_base_model",
    "evaluate_model",
    "greedy_answers",
    "load_evaluation_tasks",
    "load_experiment",
    "prepare_stages",
    "pretrain_base_model",
    "run_cell",
    "run_experiment",
    "score_synthetic_task",
    "ultrafeedback_rows",
    "write_synthetic_data",
]
