"""Evaluation tasks: benchmark rows (local files or the Hugging Face hub) turned into items a model can score.

A multiple-choice item is one context and several continuations: the scorer encodes the context once and scores
every continuation (`" " + option`); or, for "partial" scoring (WinoGrande), one context per option and a
shared continuation scored after each. A generation item is a prompt and the reference final answer.

Two prompt styles:

* ``"full"`` -- the Bitune paper's style, options listed in the prompt:
  ``"Question: {q}\\n\\nChoices:\\n{option 1}\\n{option 2}\\n\\nAnswer:"``; each option is a continuation.
  Generation: ``"Question: {q}\\n\\nAnswer:"``.
* ``"plain"`` -- lm-evaluation-harness 0.4.13's own zero-shot prompt for the task, character for character
  (its task YAMLs' ``doc_to_text``, ``doc_to_choice``, ``description`` and ``target_delimiter``), so that
  results compare with published lm-eval numbers.

Your own task needs no code: a small YAML or JSON spec names the fields of a local file (see `load_task` and
docs/tasks.md, one example per task shape).

Example (from the repository root):
    >>> task = load_task("arc_easy", data_dir="../shared/data", limit=2)
    >>> item = task.items[0]
    >>> print(item.context)
    Question: Which statement best explains why photosynthesis is the foundation of most food webs?
    <BLANKLINE>
    Choices:
    Sunlight is the source of energy for nearly all ecosystems.
    Most ecosystems are found on land instead of in water.
    Carbon dioxide is more available than other gases.
    The producers in all ecosystems are plants.
    <BLANKLINE>
    Answer:
    >>> item.continuations[item.gold]
    ' Sunlight is the source of energy for nearly all ecosystems.'
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from bitune.core.prompts import render_prompt
from bitune.data.records import load_records
from bitune.errors import BituneInputError
from bitune.files import atomic_write_text
from bitune.settings import read_yaml_mapping

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
# GSM8K answers, as lm-eval's gsm8k task extracts them (used by the scorer and by the lm-eval export).
STRICT_ANSWER_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_ANSWER_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORED_ANSWER_PATTERNS = (",", r"\$", r"(?s).*#### ", r"\.$")

STYLES = ("full", "plain")
TARGET_DELIMITER = " "  # between context and option, as lm-eval's default `target_delimiter`
# lm-eval's gsm8k `until` and `max_gen_toks`: generation stops at the first of these strings.
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
MAX_NEW_TOKENS = 256


@dataclass
class MultipleChoiceItem:
    """A context and its options; `requests[i]` is the (context, continuation) the model scores for option i.

    Partial scoring (`continuation` set; WinoGrande, lm-eval's "multiple input" tasks): each option is its own
    context (`choices[i]`, e.g. the sentence up to the blank with the option filled in), `context` is empty,
    and every option scores the same `continuation` (the rest of the sentence).

    Example:
        >>> MultipleChoiceItem("0", "Q: 2+2?\\nA:", ["4", "5"], 0).requests
        [('Q: 2+2?\\nA:', ' 4'), ('Q: 2+2?\\nA:', ' 5')]
        >>> MultipleChoiceItem("1", "", ["Ann ate because Ann", "Ann ate because Bob"], 0, continuation="was hungry.").requests
        [('Ann ate because Ann', ' was hungry.'), ('Ann ate because Bob', ' was hungry.')]
    """

    id: str
    context: str
    # The options as lm-eval's `doc_to_choice` gives them (no delimiter); acc_norm divides by their length.
    choices: list[str]
    gold: int
    group: str | None = None  # e.g. the MMLU subject
    continuation: str | None = None  # partial scoring: the text every option's context is scored on

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Per option, the context and the continuation scored after it (as lm-eval builds them)."""
        if self.continuation is None:
            return [(self.context, TARGET_DELIMITER + choice) for choice in self.choices]
        return [(self.context + choice, TARGET_DELIMITER + self.continuation) for choice in self.choices]

    @property
    def continuations(self) -> list[str]:
        return [continuation for _, continuation in self.requests]


@dataclass
class GenerationItem:
    """A prompt to continue greedily, and the reference final answer (e.g. GSM8K's number after '####')."""

    id: str
    prompt: str
    target: str
    group: str | None = None


@dataclass
class Task:
    """The items of one task in one prompt style, and where they were read from."""

    name: str
    kind: Literal["multiple_choice", "generation"]
    style: str
    source: str
    items: list[MultipleChoiceItem] | list[GenerationItem]
    split: str | None = None
    stop_sequences: tuple[str, ...] = STOP_SEQUENCES  # generation only
    max_new_tokens: int = MAX_NEW_TOKENS  # generation only

    @property
    def groups(self) -> list[str]:
        return sorted({item.group for item in self.items if item.group is not None})


# ---------------------------------------------------------------------------------------------- task specs


@dataclass(frozen=True)
class _Spec:
    """Which fields of a row hold the question, the options and the answer."""

    name: str
    kind: str
    question: tuple[str, ...]  # joined with a space (SIQA: context, question)
    answer: str
    choices: str | tuple[str, ...] = ()  # one field holding a list, or one field per option
    # The answer is a label, not an index: the labels themselves, or the field holding each row's labels.
    labels: str | tuple[str, ...] | None = None
    num_choices: int | None = None
    group: str | None = None
    # Generation: the target is the answer's text after its last delimiter (GSM8K: "####").
    answer_delimiter: str | None = None
    template: str | None = (
        None  # a custom prompt with {question} (and {choices}), or Jinja; replaces the style
    )
    data: Path | None = None
    fixed_choices: tuple[str, ...] | None = None  # the same options for every row
    blank: str | None = None  # partial scoring: each option fills this blank of the question
    choice_template: str | None = None  # Jinja over the row and `choice`: how each option reads

    @property
    def jinja(self) -> bool:
        """Whether `template` is Jinja (over the row's fields) rather than {question}/{choices} placeholders."""
        return self.template is not None and is_jinja(self.template)


@dataclass(frozen=True)
class _Question:
    text: str
    options: list[str]
    group: str | None


@dataclass(frozen=True)
class _Hub:
    path: str
    config: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class _Builtin:
    spec: _Spec
    hub: _Hub
    default_split: str
    plain: Callable[[_Question], tuple[str, list[str]]] | None = None  # lm-eval's prompt, if not the default


def _plain_question_answer(question: _Question) -> tuple[str, list[str]]:
    """lm-eval's piqa and arc prompt, and the plain style of spec tasks."""
    return f"Question: {question.text}\nAnswer:", question.options


def _plain_social_iqa(question: _Question) -> tuple[str, list[str]]:
    return f"Q: {question.text}\nA:", question.options


def _lettered(question: _Question) -> tuple[str, list[str]]:
    letters = list(string.ascii_uppercase[: len(question.options)])
    listing = "".join(
        f"{letter}. {option}\n" for letter, option in zip(letters, question.options, strict=True)
    )
    return f"{question.text.strip()}\n{listing}Answer:", letters


def _plain_commonsense_qa(question: _Question) -> tuple[str, list[str]]:
    context, letters = _lettered(question)
    return f"Question: {context}", letters


def _plain_mmlu(question: _Question) -> tuple[str, list[str]]:
    # lm-eval prepends each subject's `description` to the prompt.
    subject = (question.group or "").replace("_", " ")
    context, letters = _lettered(question)
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n{context}",
        letters,
    )


def _arc(name: str, config: str) -> _Builtin:
    spec = _Spec(name, MULTIPLE_CHOICE, ("question",), "answerKey", "choices.text", labels="choices.label")
    return _Builtin(spec, _Hub("allenai/ai2_arc", config), "test")


_BUILTINS: dict[str, _Builtin] = {
    "piqa": _Builtin(
        _Spec("piqa", MULTIPLE_CHOICE, ("goal",), "label", ("sol1", "sol2")),
        # The hub repository's main branch holds a loading script, which datasets>=4 refuses to run.
        _Hub("ybisk/piqa", revision="refs/convert/parquet"),
        "validation",
    ),
    "arc_challenge": _arc("arc_challenge", "ARC-Challenge"),
    "arc_easy": _arc("arc_easy", "ARC-Easy"),
    "commonsense_qa": _Builtin(
        _Spec(
            "commonsense_qa", MULTIPLE_CHOICE, ("question",), "answerKey", "choices.text", "choices.label", 5
        ),
        _Hub("tau/commonsense_qa"),
        "validation",
        _plain_commonsense_qa,
    ),
    "social_i_qa": _Builtin(
        _Spec(
            "social_i_qa",
            MULTIPLE_CHOICE,
            ("context", "question"),
            "label",
            ("answerA", "answerB", "answerC"),
            labels=("1", "2", "3"),
        ),
        _Hub("allenai/social_i_qa", revision="refs/convert/parquet"),
        "validation",
        _plain_social_iqa,
    ),
    "mmlu": _Builtin(
        _Spec("mmlu", MULTIPLE_CHOICE, ("question",), "answer", "choices", num_choices=4, group="subject"),
        _Hub("cais/mmlu", "all"),
        "test",
        _plain_mmlu,
    ),
    "gsm8k": _Builtin(
        _Spec("gsm8k", GENERATION, ("question",), "answer", answer_delimiter="####"),
        _Hub("openai/gsm8k", "main"),
        "test",
    ),
}
TASK_NAMES = tuple(_BUILTINS)
_SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def load_task(
    name: str | Path,
    *,
    data_dir: str | Path | None = None,
    path: str | Path | None = None,
    split: str | None = None,
    style: str = "full",
    limit: int | None = None,
) -> Task:
    """Read a task's rows and format them as items.

    Args:
        name: a built-in task (`TASK_NAMES`: piqa, arc_challenge, arc_easy, commonsense_qa, social_i_qa, mmlu,
            gsm8k) or the path of a task spec (.yaml/.yml/.json, see below).
        data_dir: built-in tasks: a folder holding `<task>/<split>.jsonl` in the hub dataset's schema (e.g.
            ../shared/data).
        path: one data file (.jsonl, .json, .csv or .parquet) in the hub dataset's schema (for a spec: replaces
            its `data`). Without `data_dir` and `path`, built-in tasks download from the Hugging Face hub.
        split: built-in tasks: default validation for piqa, commonsense_qa, social_i_qa; test for the others.
        style: "full" (the Bitune paper's prompts, options listed) or "plain" (lm-eval's prompts).
        limit: read only the first `limit` rows, like lm-eval's `--limit`.

    A task spec names the fields of a local file; unknown keys are errors (docs/tasks.md has one example per
    task shape: options in the row, fixed options, a blank to fill, HellaSwag-style endings, generation)::

        name: my_quiz                  # default: the spec file's name
        kind: multiple_choice          # or generation
        data: quiz.jsonl               # relative to the spec file
        question: question             # a field, or a list of fields joined with a space
        choices: options               # a field holding a list, or a list of fields (one per option)
        fixed_choices: [no, yes]       # or: the same options for every row (instead of choices)
        answer: label                  # the correct option: its 0-based index, or its label when `labels` is set
        labels: [A, B, C, D]           # optional: the options' labels, or a field holding them (choices.label)
        num_choices: 4                 # optional: the exact number of options every row must have
        group: subject                 # optional: report per value of this field (like MMLU subjects)
        answer_delimiter: "####"       # generation, optional: the target is the answer's text after this
        template: "Q: {question}\\nOptions:\\n{choices}\\nA:"   # optional; replaces the style's prompt
        template: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"   # or Jinja over the row, as lm-eval's doc_to_text
        choice_template: "{{choice | trim}}"   # optional, Jinja over the row and `choice`: each option's text
        blank: "_"                     # optional: partial scoring (WinoGrande): each option fills the question's
                                       #   blank, and is scored on the rest of the question after it

    Dotted names (`choices.text`) reach into nested objects. A template containing `{{` or `{%` is Jinja (with
    lm-eval's `regex_replace` filter), else `{question}`/`{choices}` placeholders. In spec files `yes`, `no`,
    `on` and `off` are text, not YAML booleans (only `true` and `false` are). A generation task's answers are
    numbers, scored like GSM8K (see `bitune.evaluation.metrics.generation_scores`).

    Raises:
        BituneInputError: unknown task, unreadable spec, or a malformed row (the message names file, line, field).

    Example (from the repository root):
        >>> task = load_task("mmlu", data_dir="../shared/data", style="plain", limit=1)
        >>> print(task.items[0].context)
        The following are multiple choice questions (with answers) about abstract algebra.
        <BLANKLINE>
        Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.
        A. 0
        B. 4
        C. 2
        D. 6
        Answer:
        >>> task.items[0].continuations, task.items[0].gold
        ([' A', ' B', ' C', ' D'], 1)
    """
    if style not in STYLES:
        raise BituneInputError(f"Unknown prompt style {style!r}; use one of {', '.join(STYLES)}.")
    if limit is not None and limit < 0:
        raise BituneInputError(f"limit must be a non-negative number of rows, got {limit}.")
    if data_dir is not None and path is not None:
        raise BituneInputError("Give either data_dir or path, not both.")

    name = str(name)
    plain = None
    if name in _BUILTINS:
        builtin = _BUILTINS[name]
        spec, plain, split = builtin.spec, builtin.plain, split or builtin.default_split
        if path is None and data_dir is None:
            rows, source = _read_hub(builtin.hub, split, limit), f"{builtin.hub.path} ({split})"
        else:
            file = Path(path) if path is not None else Path(data_dir) / name / f"{split}.jsonl"  # type: ignore[arg-type]
            if path is None and not file.is_file():
                raise BituneInputError(
                    f"{file}: no such file. data_dir must hold <task>/<split>.jsonl files "
                    f"(here {name}/{split}.jsonl); pass path= to read another file."
                )
            rows, source = _read_file(file, limit), str(file)
    elif name.endswith(_SPEC_SUFFIXES):
        spec = _read_spec(Path(name))
        data = Path(path) if path is not None else spec.data
        rows, source, split = _read_file(data, limit), str(data), None  # type: ignore[arg-type]
    else:
        raise BituneInputError(
            f"Unknown task {name!r}: use one of {', '.join(TASK_NAMES)}, or the path of a task spec "
            f"({'/'.join(_SPEC_SUFFIXES)})."
        )

    if spec.kind == GENERATION:
        items: list = [_generation_item(index, row, spec, style) for index, row in enumerate(rows)]
    else:
        items = [_multiple_choice_item(index, row, spec, style, plain) for index, row in enumerate(rows)]
    return Task(name=spec.name, kind=spec.kind, style=style, source=source, items=items, split=split)


# ---------------------------------------------------------------------------------------------- rows -> items


def _multiple_choice_item(
    index: int, row: _Row, spec: _Spec, style: str, plain: Callable[[_Question], tuple[str, list[str]]] | None
) -> MultipleChoiceItem:
    options = list(spec.fixed_choices) if spec.fixed_choices is not None else _options(row, spec)
    if spec.choice_template is not None:
        options = [row.render(spec.choice_template, "choice_template", choice=option) for option in options]
        for number, option in enumerate(options, 1):
            if not option:
                raise row.error("choice_template", f"option {number} renders empty")
    gold = _gold_index(row, spec, len(options))
    group = row.text(spec.group) if spec.group else None
    text = row.render(spec.template, "template") if spec.jinja else _question_text(row, spec)
    if spec.blank is not None:  # partial scoring: one context per option, one shared continuation
        where = "template" if spec.jinja else ", ".join(spec.question)
        if spec.blank not in text:
            raise row.error(where, f"no blank {spec.blank!r} in {text!r}")
        before, _, after = text.partition(spec.blank)
        contexts = [before + option for option in options]
        return MultipleChoiceItem(
            f"{spec.name}-{index}", "", contexts, gold, group, continuation=after.strip()
        )
    question = _Question(text, options, group)
    if spec.jinja:
        context, choices = text, options
    elif spec.template is not None:
        context, choices = spec.template.format(question=question.text, choices="\n".join(options)), options
    elif style == "full":
        listing = "\n".join(options)
        context, choices = f"Question: {question.text.strip()}\n\nChoices:\n{listing}\n\nAnswer:", options
    else:
        context, choices = (plain or _plain_question_answer)(question)
    return MultipleChoiceItem(f"{spec.name}-{index}", context, choices, gold, question.group)


def _generation_item(index: int, row: _Row, spec: _Spec, style: str) -> GenerationItem:
    question = "" if spec.jinja else _question_text(row, spec)
    if spec.jinja:
        prompt = row.render(spec.template, "template")
    elif spec.template is not None:
        prompt = spec.template.format(question=question)
    elif style == "full":
        prompt = render_prompt(question.strip(), "plain")  # the training template
    else:
        prompt = f"Question: {question}\nAnswer:"  # lm-eval's gsm8k prompt

    answer = row.value(spec.answer)
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise row.error(spec.answer, f"expected the reference answer as text or a number, got {answer!r}")
    answer = str(answer)
    if spec.answer_delimiter is not None:
        if spec.answer_delimiter not in answer:
            raise row.error(spec.answer, f"no {spec.answer_delimiter!r} before the final answer")
        answer = answer.split(spec.answer_delimiter)[-1]
    group = row.text(spec.group) if spec.group else None
    return GenerationItem(f"{spec.name}-{index}", prompt, answer.strip(), group)


def _question_text(row: _Row, spec: _Spec) -> str:
    return " ".join(row.text(name) for name in spec.question)


def _options(row: _Row, spec: _Spec) -> list[str]:
    if isinstance(spec.choices, tuple):
        for name in spec.choices:
            if not row.has(name):
                raise row.error(
                    name,
                    "missing (choices names the fields holding the options; for the same option texts in "
                    f"every row write fixed_choices: [{', '.join(spec.choices)}])",
                )
    options = row.texts(spec.choices)
    where = spec.choices if isinstance(spec.choices, str) else ", ".join(spec.choices)
    if spec.num_choices is not None and len(options) != spec.num_choices:
        raise row.error(where, f"expected {spec.num_choices} options, found {len(options)}")
    if len(options) < 2:
        raise row.error(where, f"a multiple-choice question needs at least 2 options, found {len(options)}")
    for number, option in enumerate(options, 1):
        if not option:  # acc_norm divides by the option's length
            raise row.error(where, f"option {number} is empty")
    return options


def _gold_index(row: _Row, spec: _Spec, num_options: int) -> int:
    answer = row.value(spec.answer)
    if spec.labels is not None:
        labels = list(spec.labels) if isinstance(spec.labels, tuple) else row.texts(spec.labels)
        if isinstance(spec.labels, str) and len(labels) != num_options:
            raise row.error(spec.labels, f"{len(labels)} labels for {num_options} options")
        if str(answer) not in labels:
            raise row.error(spec.answer, f"{answer!r} is not one of the labels {', '.join(labels)}")
        gold = labels.index(str(answer))
    else:
        if isinstance(answer, str) and answer.strip().isdigit():  # CSV cells are text
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise row.error(spec.answer, f"expected the 0-based index of the correct option, got {answer!r}")
        gold = answer
    if not 0 <= gold < num_options:
        raise row.error(spec.answer, f"answer {answer!r} is out of range for {num_options} options")
    return gold


# ---------------------------------------------------------------------------------------------- reading rows


class _Row:
    """One input row and where it came from, so that every complaint names the file, the line and the field."""

    def __init__(self, fields: Mapping[str, Any], where: str) -> None:
        self.fields = fields
        self.where = where

    def error(self, field: str, problem: str) -> BituneInputError:
        return BituneInputError(f"{self.where}, field '{field}': {problem}. Fix or remove this row.")

    def value(self, field: str) -> Any:
        value: Any = self.fields
        for key in field.split("."):
            if not isinstance(value, Mapping) or value.get(key) is None:
                raise self.error(field, "missing")
            value = value[key]
        return value

    def has(self, field: str) -> bool:
        try:
            self.value(field)
        except BituneInputError:
            return False
        return True

    def render(self, template: str, key: str, **extra: Any) -> str:
        """A Jinja template (of the spec's `key`) over this row's fields (and `extra`)."""
        from jinja2 import TemplateError

        try:
            return _jinja_template(template).render(**{**self.fields, **extra})
        except TemplateError as error:
            raise self.error(key, f"the Jinja template fails on this row ({error})") from None

    def text(self, field: str) -> str:
        value = self.value(field)
        if not isinstance(value, str):
            raise self.error(field, f"expected text, got {type(value).__name__} {value!r}")
        return value

    def texts(self, fields: str | tuple[str, ...]) -> list[str]:
        """A field holding a list of texts, or one text from each of several fields."""
        if isinstance(fields, tuple):
            return [self.text(name) for name in fields]
        values = self.value(fields)
        if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
            raise self.error(fields, f"expected a list of texts, got {values!r}")
        return values


def _read_file(path: Path, limit: int | None) -> list[_Row]:
    if not path.is_file():  # checked here: `load_records` would try the hub for an unknown name
        raise BituneInputError(f"{path}: no such data file; check the path or data_dir.")
    return [_Row(record.fields, record.location) for record in load_records(path)[:limit]]


def is_jinja(template: str) -> bool:
    """Whether a spec's template is Jinja (it holds `{{` or `{%`) rather than `{question}` placeholders."""
    return "{{" in template or "{%" in template


def _jinja_environment():
    """lm-eval's Jinja set-up (undefined names are errors, trailing newlines kept, `regex_replace`), sandboxed."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    environment.filters["regex_replace"] = lambda text, pattern, replacement, count=0: re.sub(
        pattern, replacement, text, count=count
    )
    return environment


_JINJA_TEMPLATES: dict[str, Any] = {}


def _jinja_template(text: str):
    if text not in _JINJA_TEMPLATES:
        _JINJA_TEMPLATES[text] = _jinja_environment().from_string(text)
    return _JINJA_TEMPLATES[text]


def _read_hub(hub: _Hub, split: str, limit: int | None) -> list[_Row]:
    import datasets  # slow to import, and only the hub path needs it

    try:
        dataset = datasets.load_dataset(hub.path, hub.config, split=split, revision=hub.revision)
    except (OSError, ValueError) as err:
        raise BituneInputError(
            f"Could not load {hub.path} ({split}) from the Hugging Face hub: {err}. "
            "Offline, pass data_dir or path to read local files."
        ) from err
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [_Row(record, f"{hub.path} ({split}), row {number}") for number, record in enumerate(dataset)]


# ---------------------------------------------------------------------------------------------- spec files

_SPEC_KEYS = (
    "name",
    "kind",
    "data",
    "question",
    "choices",
    "answer",
    "labels",
    "num_choices",
    "group",
    "answer_delimiter",
    "template",
    "fixed_choices",
    "choice_template",
    "blank",
)
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _read_spec(path: Path) -> _Spec:
    def fail(key: str, problem: str) -> BituneInputError:
        return BituneInputError(f"{path}, key '{key}': {problem}. See bitune.evaluation.tasks.load_task.")

    def names(key: str, value: Any) -> tuple[str, ...]:
        listed = value if isinstance(value, list) else [value]
        if not listed or not all(isinstance(name, str) and name for name in listed):
            raise fail(key, f"expected a field name or a list of field names, got {value!r}")
        return tuple(listed)

    raw = read_yaml_mapping(path, "task spec file", f"keys ({', '.join(_SPEC_KEYS)})", yes_no_text=True)
    for key in raw:
        if key not in _SPEC_KEYS:
            raise fail(key, f"unknown key; the keys are {', '.join(_SPEC_KEYS)}")
    template = raw.get("template")
    if template is not None and not isinstance(template, str):
        raise fail("template", f"expected text, got {template!r}")
    jinja = template is not None and is_jinja(template)
    for key in ("data", "answer") if jinja else ("data", "question", "answer"):
        if raw.get(key) is None:
            raise fail(key, "required" + ("" if key != "question" else " (unless template is Jinja)"))

    kind = raw.get("kind", MULTIPLE_CHOICE)
    if kind not in (MULTIPLE_CHOICE, GENERATION):
        raise fail("kind", f"expected {MULTIPLE_CHOICE} or {GENERATION}, got {kind!r}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise fail("name", f"use letters, digits, '_', '-' or '.', got {name!r}")
    if not isinstance(raw["data"], str):
        raise fail("data", f"expected a file path, got {raw['data']!r}")
    if not isinstance(raw["answer"], str):
        raise fail("answer", f"expected a field name, got {raw['answer']!r}")

    choices: str | tuple[str, ...] = ()
    fixed: tuple[str, ...] | None = None
    labels: str | tuple[str, ...] | None = None
    num_choices = raw.get("num_choices")
    if kind == MULTIPLE_CHOICE:
        if (raw.get("choices") is None) == (raw.get("fixed_choices") is None):
            raise fail(
                "choices",
                "a multiple_choice task needs choices (the field(s) holding each row's options) or "
                "fixed_choices (the same option texts for every row), one of the two",
            )
        if raw.get("fixed_choices") is not None:
            fixed = _fixed_choices(raw["fixed_choices"], fail)
        elif isinstance(raw["choices"], str):
            choices = raw["choices"]
        elif isinstance(raw["choices"], list) and any(isinstance(c, bool) for c in raw["choices"]):
            raise fail(
                "choices",
                f"{raw['choices']!r} holds YAML booleans, not field names; for the same option texts in every "
                'row write fixed_choices: ["false", "true"] (quoted)',
            )
        else:
            choices = names("choices", raw["choices"])
        labels = raw.get("labels")
        if isinstance(labels, list) and labels and all(isinstance(label, str | int) for label in labels):
            labels = tuple(str(label) for label in labels)  # compared as text with each row's answer
        elif labels is not None and not isinstance(labels, str):
            raise fail("labels", f"expected a list of labels or the field holding them, got {labels!r}")
        if num_choices is not None and (isinstance(num_choices, bool) or not isinstance(num_choices, int)):
            raise fail("num_choices", f"expected a whole number, got {num_choices!r}")
    else:
        for key in ("choices", "fixed_choices", "labels", "num_choices", "choice_template", "blank"):
            if key in raw:
                raise fail(key, "only for multiple_choice tasks")
    if raw.get("group") is not None and not isinstance(raw["group"], str):
        raise fail("group", f"expected a field name, got {raw['group']!r}")
    delimiter = raw.get("answer_delimiter")
    if delimiter is not None and (kind != GENERATION or not isinstance(delimiter, str) or not delimiter):
        raise fail("answer_delimiter", "a non-empty text, for generation tasks only")

    for key in ("choice_template", "blank"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or not raw[key]):
            raise fail(key, f"expected a non-empty text, got {raw[key]!r}")
    for key in ("template", "choice_template") if jinja else ("choice_template",):
        if raw.get(key) is not None:
            from jinja2 import TemplateError

            try:
                _jinja_template(raw[key])
            except TemplateError as err:
                raise fail(key, f"not a valid Jinja template ({err})") from None
    if raw.get("blank") is not None and template is not None and not jinja:
        raise fail("template", "with blank, use a Jinja template (the text that holds the blank) or none")
    if template is not None and not jinja:
        allowed = ("question", "choices") if kind == MULTIPLE_CHOICE else ("question",)
        try:
            used = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except (ValueError, TypeError) as err:
            raise fail(
                "template", f"not a valid format string ({err}); write literal braces as {{{{ }}}}"
            ) from err
        if not used or any(name not in allowed for name in used):
            raise fail("template", f"use the placeholders {', '.join('{' + n + '}' for n in allowed)}")

    return _Spec(
        name=name,
        kind=kind,
        question=names("question", raw["question"]) if raw.get("question") is not None else (),
        answer=raw["answer"],
        choices=choices,
        labels=labels,
        num_choices=num_choices,
        group=raw.get("group"),
        answer_delimiter=delimiter,
        template=template,
        data=path.parent / raw["data"],
        fixed_choices=fixed,
        blank=raw.get("blank"),
        choice_template=raw.get("choice_template"),
    )


def _fixed_choices(value: Any, fail: Callable[[str, str], BituneInputError]) -> tuple[str, ...]:
    """`fixed_choices` as texts: numbers become text; YAML booleans are refused (their spelling is lost)."""
    if not isinstance(value, list) or len(value) < 2:
        raise fail("fixed_choices", f"expected a list of at least 2 option texts, got {value!r}")
    texts = []
    for option in value:
        if isinstance(option, bool):
            raise fail(
                "fixed_choices",
                f'{option!r} was read as a boolean; quote the option texts (fixed_choices: ["false", "true"])',
            )
        if not isinstance(option, str | int | float) or not str(option):
            raise fail("fixed_choices", f"expected option texts, got {option!r}")
        texts.append(str(option))
    return tuple(texts)


# ---------------------------------------------------------------------------------------------- lm-eval export

_MULTIPLE_CHOICE_METRICS = [
    {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in ("acc", "acc_norm")
]
# lm-eval's gsm8k metric and answer filters, which metrics.generation_scores reproduces.
_GENERATION_METRICS = [
    {
        "metric": "exact_match",
        "aggregation": "mean",
        "higher_is_better": True,
        "ignore_case": True,
        "ignore_punctuation": False,
        "regexes_to_ignore": list(IGNORED_ANSWER_PATTERNS),
    }
]
_GENERATION_FILTERS = [
    {
        "name": "strict-match",
        "filter": [{"function": "regex", "regex_pattern": STRICT_ANSWER_PATTERN}, {"function": "take_first"}],
    },
    {
        "name": "flexible-extract",
        "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": FLEXIBLE_ANSWER_PATTERN},
            {"function": "take_first"},
        ],
    },
]


def export_lm_eval_task(task: Task, folder: str | Path, *, task_name: str | None = None) -> str:
    """Write `task`'s items and an lm-eval task YAML into `folder`, for lm-eval's `--include_path`.

    Stock lm-eval then builds exactly our prompts: each item's context (or prompt) is stored as it is, so
    `doc_to_text` only reads it back, and lm-eval joins context and option with `target_delimiter: " "`,
    zero-shot. A task with groups (MMLU subjects) becomes one lm-eval task per group plus a group that
    averages them weighted by size (our micro average). Returns the name to pass to `--tasks`.

    Example:
        >>> import tempfile
        >>> task = load_task("piqa", data_dir="../shared/data", limit=3)
        >>> export_lm_eval_task(task, tempfile.mkdtemp())
        'bitune_piqa_full'

    Then: `lm-eval run --model hf --model_args pretrained=... --include_path FOLDER --tasks bitune_piqa_full`.
    """
    folder = Path(folder).resolve()
    name = task_name or f"bitune_{task.name}_{task.style}"
    if not _TASK_NAME.fullmatch(name):
        raise BituneInputError(f"lm-eval task name {name!r}: use letters, digits, '_', '-' or '.'.")
    if not task.groups:
        _write_lm_eval_task(task, task.items, folder, name)
        return name

    subtasks = {}
    for group in task.groups:
        subtask = f"{name}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', group)}"
        if subtask in subtasks:
            raise BituneInputError(
                f"Groups {subtasks[subtask]!r} and {group!r} give the same lm-eval task name."
            )
        subtasks[subtask] = group
        items = [item for item in task.items if item.group == group]
        _write_lm_eval_task(task, items, folder, subtask, alias=group)
    metric_names = ["acc", "acc_norm"] if task.kind == MULTIPLE_CHOICE else ["exact_match"]
    group_config = {
        "group": name,
        "task": list(subtasks),
        "aggregate_metric_list": [
            {"metric": metric, "aggregation": "mean", "weight_by_size": True} for metric in metric_names
        ],
        "metadata": {"version": 1.0},
    }
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(group_config, sort_keys=False))
    return name


def _write_lm_eval_task(task: Task, items: list, folder: Path, name: str, alias: str | None = None) -> None:
    data_file = folder / f"{name}.jsonl"
    if task.kind == MULTIPLE_CHOICE and items and items[0].continuation is not None:
        # lm-eval's "multiple input" tasks (WinoGrande): `doc_to_text` gives the gold index, `doc_to_choice`
        # one context per option, `doc_to_target` the continuation all of them are scored on.
        records = [
            {
                "id": i.id,
                "choices": [i.context + c for c in i.choices],
                "gold": i.gold,
                "continuation": i.continuation,
            }
            for i in items
        ]
        fields: dict[str, Any] = {
            "output_type": "multiple_choice",
            "doc_to_text": "gold",
            "doc_to_choice": "choices",
            "doc_to_target": "continuation",
            "target_delimiter": TARGET_DELIMITER,
            "metric_list": _MULTIPLE_CHOICE_METRICS,
        }
    elif task.kind == MULTIPLE_CHOICE:
        records = [{"id": i.id, "context": i.context, "choices": i.choices, "gold": i.gold} for i in items]
        fields = {
            "output_type": "multiple_choice",
            "doc_to_text": "context",  # a column name: lm-eval returns the field unchanged
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": TARGET_DELIMITER,
            "metric_list": _MULTIPLE_CHOICE_METRICS,
        }
    else:
        records = [{"id": i.id, "prompt": i.prompt, "target": i.target} for i in items]
        fields = {
            "output_type": "generate_until",
            "doc_to_text": "prompt",
            "doc_to_target": "target",
            "generation_kwargs": {
                "until": list(task.stop_sequences),
                "do_sample": False,
                "temperature": 0.0,
                "max_gen_toks": task.max_new_tokens,
            },
            "metric_list": _GENERATION_METRICS,
            "filter_list": _GENERATION_FILTERS,
        }
    config = {
        "task": name,
        **({"task_alias": alias} if alias is not None else {}),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "num_fewshot": 0,
        **fields,
        "metadata": {"version": 1.0},
    }
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(data_file, lines)
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


__all__ = [
    "GENERATION",
    "MULTIPLE_CHOICE",
    "STYLES",
    "TASK_NAMES",
    "GenerationItem",
    "MultipleChoiceItem",
    "Task",
    "export_lm_eval_task",
    "load_task",
]
