"""Task specs, fuzzed: any spec file and any data rows give a `Task` or a `BituneInputError` naming the spec or the
row, nothing else (like the data loader's fuzzing in tests/data/test_samples.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bitune.errors import BituneInputError
from bitune.evaluation import tasks
from bitune.evaluation.tasks import GenerationItem, MultipleChoiceItem, load_task

KEYS = list(getattr(tasks, "_SPEC_KEYS", ())) or ["name", "kind", "data", "question", "choices", "answer"]
FIELDS = [
    "question",
    "choices",
    "answer",
    "label",
    "options",
    "context",
    "subject",
    "choices.text",
    "choices.label",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.sampled_from(
        FIELDS + ["multiple_choice", "generation", "{question}", "{choices}", "{", "####", "rows.jsonl"]
    )
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3),
    max_leaves=6,
)
ROW = st.fixed_dictionaries(
    {},
    optional={
        "question": st.text(max_size=10) | st.integers(),
        "choices": st.lists(st.text(max_size=5), max_size=4)
        | st.builds(
            lambda texts: {"text": texts, "label": [chr(65 + i) for i in range(len(texts))]},
            st.lists(st.text(min_size=1, max_size=5), max_size=4),
        ),
        "answer": st.integers(-1, 4) | st.sampled_from(["A", "B", "1", "x #### 4"]),
        "label": st.sampled_from(["A", "B", 0, 1, None]),
        "subject": st.text(max_size=5),
    },
)
# Rows the good spec reads; ROW then makes junk of them.
VALID_ROW = st.builds(
    lambda question, choices, data: {
        "question": question,
        "choices": choices,
        "answer": data.draw(st.integers(0, len(choices) - 1)),
    },
    st.text(min_size=1, max_size=8),
    st.lists(st.text(min_size=1, max_size=5), min_size=2, max_size=4),
    st.data(),
)
ROWS = st.lists(VALID_ROW | VALID_ROW | ROW, min_size=1, max_size=3)
GOOD_SPEC = {"data": "rows.jsonl", "question": "question", "choices": "choices", "answer": "answer"}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def loads_or_refuses(spec: str | bytes, rows: list[dict] | bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "quiz.yaml"
        path.write_bytes(spec if isinstance(spec, bytes) else spec.encode("utf-8", "surrogatepass"))
        data = rows if isinstance(rows, bytes) else "".join(json.dumps(row) + "\n" for row in rows).encode()
        (Path(folder) / "rows.jsonl").write_bytes(data)
        try:
            task = load_task(path, style="full")
        except BituneInputError as error:
            assert str(path) in str(error) or "rows.jsonl" in str(error) or "quiz" in str(error), error
            event("refused")
            return
    event("loaded")
    for item in task.items:
        if isinstance(item, MultipleChoiceItem):
            assert len(item.choices) >= 2 and 0 <= item.gold < len(item.choices) and all(item.choices)
        else:
            assert isinstance(item, GenerationItem) and isinstance(item.target, str)


@FUZZ
@given(st.binary(max_size=120), ROWS)
def test_random_bytes(spec: bytes, rows: list[dict]) -> None:
    loads_or_refuses(spec, rows)


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=6), VALUES), max_size=3),
    ROWS,
)
def test_random_values_at_any_key(edits: list[tuple[str, object]], rows: list[dict]) -> None:
    spec = dict(GOOD_SPEC)
    for key, value in edits:
        spec[key] = value
    loads_or_refuses(yaml.safe_dump(spec, allow_unicode=True), rows)


@FUZZ
@given(ROWS, st.binary(max_size=60), st.booleans())
def test_random_rows(rows: list[dict], junk: bytes, append_junk: bool) -> None:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode() + (junk if append_junk else b"")
    loads_or_refuses(yaml.safe_dump(GOOD_SPEC), data)


LINES = st.sampled_from(
    ["data: rows.jsonl", "question: question", "choices: choices", "answer: answer", "answer: label",
     "kind: generation", "labels: [A, B]", "labels: choices.label", "choices: [no, yes]", "num_choices: 2",
     "template: '{question} {choices}'", "template: '{x}'", "group: subject", "- a", "name: a b", "\t"]
)  # fmt: skip


@FUZZ
@given(st.lists(LINES, max_size=7), ROWS)
def test_random_spec_lines(lines: list[str], rows: list[dict]) -> None:
    loads_or_refuses("\n".join(lines) + "\n", rows)
