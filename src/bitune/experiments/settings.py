"""The experiment file: a grid of runs, trained and evaluated alike (`bitune experiment`, `bitune.experiments.cells`).

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
silent rebuild; see `bitune.experiments.stages`):

    synthetic: {task_types: [...], n_train: 4000, n_test: 300}   # training data + held-out questions from
                                  # bitune.experiments.synthetic; evaluation task "synthetic" scores the held-out questions
                                  # (one task per type): exact match of the greedy answer, and acc/acc_norm of
                                  # the answer's log-likelihood among all answers of its type
    ultrafeedback: {}             # the paper's instruction data: UltraFeedback's GPT-4 answers
    pretrain: {stories: 20000, steps: 1500}   # pretrain a small Llama from scratch on synthetic stories
    llama2c: {checkpoint: stories260K.bin, tokenizer: tok512.bin}    # or convert a llama2.c model

The grid sets `bitune.mode`, `peft` (kind and settings), `training.seed` and `output_dir` of every cell; the
stages set `data.path` and `model.name_or_path`; everything else is the same for all cells. The untuned base
model is scored once as a reference (`evaluation.base_model`). Where everything goes in output_dir:
`bitune.experiments.layout`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitune.core.modes import MODES
from bitune.errors import BituneInputError
from bitune.evaluation.tasks import STYLES
from bitune.experiments import synthetic
from bitune.experiments.layout import BASE_MODEL_DIR, CELLS_DIR, DATA_DIR, TRAIN_DATA_FILE, cell_name
from bitune.settings import build, expand_shorthands, merged, plain, read_with_bases
from bitune.training.config import PEFT_KINDS, SHORTHANDS, TrainConfig, read_config_file

SYNTHETIC = "synthetic"  # the evaluation task name of the held-out synthetic questions


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
        entry = build(
            TaskSettings, {"name": item} if isinstance(item, str) else item, f"evaluation.tasks[{index}]"
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
    """A parsed experiment file; `bitune.experiments.cells.run_experiment` runs it.

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
        return merged(mapping, expand_shorthands(train, SHORTHANDS))

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
                "path": str(self.root / DATA_DIR / TRAIN_DATA_FILE),
                "format": "prompt_completion",
            }
        if self.pretrain is not None or self.llama2c is not None:
            overrides["model"] = {"name_or_path": str(self.root / BASE_MODEL_DIR), "tokenizer": None}
        return TrainConfig.from_dict(
            merged(self.train_mapping(), overrides), f"{self.source}: train (cell {cell.name})"
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
        return plain(
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
        return plain({"tasks": tasks, "max_new_tokens": self.evaluation.max_new_tokens})


def load_experiment(path: str | Path, output_dir: str | Path | None = None) -> Experiment:
    """Read and check an experiment file: every cell's training config is built, so a bad key fails here.

    Raises `BituneInputError` naming the file and the key.

    Example:
        >>> load_experiment("configs/experiments/cpu_synthetic.yaml").grid.methods[:2]
        ['baseline', 'bitune']
    """
    path = Path(path)
    mapping, bases = read_with_bases(path, "experiment file", "sections (output_dir:, train:, grid:, ...)")
    if output_dir is not None:
        mapping["output_dir"] = str(output_dir)
    # A bad key may come from a base file: name them all.
    source = f"{path} (on top of {', '.join(map(str, bases))})" if bases else str(path)
    experiment = build(Experiment, {**mapping, "source": source}, source)
    for cell in experiment.cells():
        experiment.train_config(cell)
    return experiment


__all__ = [
    "SYNTHETIC",
    "Cell",
    "EvaluationSettings",
    "Experiment",
    "GridSettings",
    "Llama2cSettings",
    "PretrainSettings",
    "SyntheticSettings",
    "TaskSettings",
    "UltraFeedbackSettings",
    "load_experiment",
]
