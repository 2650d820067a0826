"""Tests of bitune.data.samples: formats, templates, length policies, bad input, junk input and the real data sets."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bitune.data.formats import FORMATS
from bitune.data.records import Record, load_records
from bitune.data.samples import DataConfig, DataStats, Sample, build_samples, load_dataset_samples, split_off
from bitune.errors import BituneInputError
from bitune.evaluation.scoring import encode_pair

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system turns go first') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Question: What is the capital of France?\n\nAnswer: Paris",
    "Add 2 and 3. The answer is 5. Choices: the cat sat on the mat",
    "<|user|> <|assistant|> <|system|> instruction input output rationale context",
]


def make_tokenizer(
    bos: bool = True, corpus: list[str] = CORPUS, vocab_size: int = 400, adds_bos: bool | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text round-trips through decode), by default trained on a few sentences.

    With `bos` it has a BOS token "<s>", which it puts in front of every text unless `adds_bos=False` (like
    SmolLM2, whose BOS is a chat marker its tokenizer does not add).
    """
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(corpus, trainer)
    if bos and adds_bos is not False:
        model.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", model.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>" if bos else None, eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


TOKENIZER = make_tokenizer()
BOS, EOS = TOKENIZER.bos_token_id, TOKENIZER.eos_token_id


def build(rows: list[dict], tokenizer: PreTrainedTokenizerFast = TOKENIZER, **options) -> list[Sample]:
    records = [Record(f"rows.jsonl, line {i + 1}", row) for i, row in enumerate(rows)]
    return build_samples(records, tokenizer, DataConfig("rows.jsonl", **options))[0]


def texts(sample: Sample, tokenizer: PreTrainedTokenizerFast = TOKENIZER) -> tuple[str, str]:
    return tokenizer.decode(sample.prompt_ids), tokenizer.decode(sample.answer_ids)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def write(folder: Path, name: str, content: bytes | str | list[dict] | pa.Table) -> Path:
    path = folder / name
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif isinstance(content, list):
        path.write_text("\n".join(json.dumps(row) for row in content), encoding="utf-8")
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# ----------------------------------------------------------------------------------------------------------
# Formats and templates

QUESTION, ANSWER = "What is the capital of France?", "Paris"
PLAIN = (f"<s>Question: {QUESTION}\n\nAnswer:", f" {ANSWER}</s>")


@pytest.mark.parametrize(
    ("row", "options"),
    [
        ({"instruction": QUESTION, "input": "", "output": ANSWER}, {}),
        ({"instruction": QUESTION, "output": ANSWER}, {"format": "alpaca"}),
        ({"prompt": QUESTION, "completion": ANSWER}, {}),
        ({"question": QUESTION, "answer": ANSWER, "rationale": "It is."}, {}),
        ({"q": QUESTION, "a": ANSWER}, {"columns": {"prompt": "q", "answer": "a"}}),
        (chat(("user", QUESTION), ("assistant", ANSWER)), {}),
        ({"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]}, {}),
    ],
    ids=[
        "alpaca",
        "alpaca-no-input",
        "prompt_completion",
        "question_answer",
        "columns",
        "openai",
        "sharegpt",
    ],
)
def test_every_format_gives_the_paper_sample(row: dict, options: dict) -> None:
    (sample,) = build([row], **options)
    assert texts(sample) == PLAIN
    # The answer's tokens follow the prompt's in the whole text (as the paper's code splits them); for a
    # byte-level tokenizer they equal " " + answer's own.
    assert sample.answer_ids == TOKENIZER(f" {ANSWER}", add_special_tokens=False)["input_ids"] + [EOS]
    assert sample.prompt_ids[0] == BOS and sample.prompt_ids.count(BOS) == 1


def test_answers_are_split_off_the_whole_text_as_the_paper_and_lm_eval_do(stories260k: Path) -> None:
    """A SentencePiece tokenizer encodes " garden" alone with an extra lone "▁"; after the prompt it has none."""
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    prompt = "Question: where is the cat?\n\nAnswer:"
    (sample,) = build([{"prompt": prompt, "completion": "garden"}], tokenizer, template="{prompt}")
    alone = tokenizer(" garden", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone)[0] == "▁"  # what the split avoids
    context_ids, continuation_ids = encode_pair(tokenizer, prompt, " garden")
    assert sample.prompt_ids == context_ids
    assert sample.answer_ids == [*continuation_ids, tokenizer.eos_token_id]


def test_an_answer_merging_with_its_prompt_is_encoded_alone() -> None:
    """Where the whole text's tokens do not start with the prompt's, no token is cut in two."""
    row = {"prompt": "the", "completion": "cat sat"}
    # The prompt ends in a space token; the whole text has " cat" as one token.
    (sample,) = build([row], template="{prompt} ")
    whole = TOKENIZER("<s>the cat sat", add_special_tokens=False)["input_ids"]
    assert whole[: len(sample.prompt_ids)] != sample.prompt_ids
    assert texts(sample) == ("<s>the ", "cat sat</s>")


def test_alpaca_input_follows_the_instruction() -> None:
    (sample,) = build([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}])
    assert texts(sample) == ("<s>Question: Add the numbers.\n\n2 and 3\n\nAnswer:", " 5</s>")


def test_csqa_lists_the_choices_and_answers_with_the_gold_text() -> None:
    row = {"question": "Where?", "choices": {"label": ["A", "B"], "text": ["home", "work"]}, "answerKey": "B"}
    (sample,) = build([row])
    assert texts(sample) == ("<s>Question: Where?\n\nChoices:\nhome\nwork\n\nAnswer:", " work</s>")


def test_columns_may_be_templates_over_the_row() -> None:
    row = {"question": "Is 5 odd?", "rationale": "5 = 2*2 + 1.", "answer": "yes"}
    columns = {"prompt": "{question} {{Think}}", "answer": "{rationale} So the answer is {answer}."}
    (sample,) = build([row], columns=columns)
    assert texts(sample) == (
        "<s>Question: Is 5 odd? {Think}\n\nAnswer:",
        " 5 = 2*2 + 1. So the answer is yes.</s>",
    )


def test_chat_template_builds_the_prompt_from_all_turns_before_the_last_answer() -> None:
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    (sample,) = build([{"messages": turns}], template="chat")
    expected = TOKENIZER.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    assert texts(sample) == (expected, f"{ANSWER}</s>")
    assert sample.prompt_ids.count(BOS) == 1  # the template writes BOS; it is not added twice


def test_chat_template_on_a_single_turn_format() -> None:
    (sample,) = build([{"prompt": QUESTION, "completion": ANSWER}], template="chat")
    assert texts(sample) == (f"<s><|user|>{QUESTION}\n<|assistant|>", f"{ANSWER}</s>")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Q: {prompt}\nA:", (f"<s>Q: {QUESTION}\nA:", f" {ANSWER}</s>")),
        ("### Q\n{prompt}\n### A\n", (f"<s>### Q\n{QUESTION}\n### A\n", f"{ANSWER}</s>")),
    ],
)
def test_custom_template_string(template: str, expected: tuple[str, str]) -> None:
    (sample,) = build([{"prompt": QUESTION, "completion": ANSWER}], template=template)
    assert texts(sample) == expected


@pytest.mark.parametrize("tokenizer_kind", ["no BOS at all", "a BOS it does not add"])
def test_tokenizer_that_adds_no_bos_gets_none(tokenizer_kind: str) -> None:
    tokenizer = (
        make_tokenizer(bos=False) if tokenizer_kind == "no BOS at all" else make_tokenizer(adds_bos=False)
    )
    (sample,) = build([{"prompt": QUESTION, "completion": ANSWER}], tokenizer)
    assert texts(sample, tokenizer) == (PLAIN[0].removeprefix("<s>"), PLAIN[1])
    assert sample.prompt_ids == tokenizer(PLAIN[0].removeprefix("<s>"))["input_ids"]
    # Bitune encodes all prompt tokens but the last twice, so a prompt needs 2 tokens: "5" alone is 1.
    with pytest.raises(BituneInputError, match="rows.jsonl, line 1: the prompt is 1 token long"):
        build([{"prompt": "5", "completion": ANSWER}], tokenizer, template="{prompt}")


# ----------------------------------------------------------------------------------------------------------
# Length policies, limit, held-out split

LONG_ROWS = [
    {"prompt": "the cat sat on the mat " * 6, "completion": "Paris " * 10},  # long prompt and answer
    {"prompt": "the cat sat on the mat " * 10, "completion": "5"},  # long prompt only
    {"prompt": "Hi", "completion": "5 " * 40},  # long answer only
    {"prompt": "Hi", "completion": "5"},  # short
]


def test_overlong_samples_are_dropped_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    records = [Record(f"rows.jsonl, line {i + 1}", row) for i, row in enumerate(LONG_ROWS)]
    with caplog.at_level(logging.WARNING, logger="bitune.data.samples"):
        samples, stats = build_samples(records, TOKENIZER, DataConfig("rows.jsonl", max_length=20))
    assert stats == DataStats(rows=4, samples=1, dropped_overlong=3)
    assert texts(samples[0]) == ("<s>Question: Hi\n\nAnswer:", " 5</s>")
    assert "dropped 3 samples longer than max_length=20" in caplog.text


@given(max_length=st.integers(4, 60))
@settings(max_examples=40, deadline=None)
def test_truncation_keeps_bos_eos_the_prompt_end_and_the_answer_start(max_length: int) -> None:
    full = build(LONG_ROWS, max_length=10_000)
    records = [Record(f"rows.jsonl, line {i + 1}", row) for i, row in enumerate(LONG_ROWS)]
    cut, stats = build_samples(
        records, TOKENIZER, DataConfig("rows.jsonl", max_length=max_length, overlong="truncate")
    )
    assert stats.truncated == sum(len(s.prompt_ids) + len(s.answer_ids) > max_length for s in full)
    for whole, part in zip(full, cut, strict=True):
        prompt, answer = part.prompt_ids, part.answer_ids
        assert len(prompt) + len(answer) == min(max_length, len(whole.prompt_ids) + len(whole.answer_ids))
        assert prompt[0] == BOS and len(prompt) >= 2 and answer[-1] == EOS
        assert prompt[1:] == whole.prompt_ids[len(whole.prompt_ids) - len(prompt) + 1 :]
        assert answer[:-1] == whole.answer_ids[: len(answer) - 1]
        # The prompt is cut first; it keeps at least half of max_length (or all of itself, if shorter).
        if len(answer) < len(whole.answer_ids):
            assert len(prompt) >= min(len(whole.prompt_ids), max_length // 2)


def test_limit_keeps_a_seeded_subset_in_file_order() -> None:
    rows = [{"prompt": f"Add {i} and 1.", "completion": str(i + 1)} for i in range(20)]
    everything = build(rows)
    subset = build(rows, limit=5, seed=1)
    assert len(subset) == 5 and subset == build(rows, limit=5, seed=1) != build(rows, limit=5, seed=2)
    positions = [everything.index(sample) for sample in subset]
    assert positions == sorted(positions)


@pytest.mark.parametrize("size", [3, 0.25])
def test_split_off_holds_out_a_seeded_disjoint_part(size: int | float) -> None:
    items = list(range(12))
    rest, held_out = split_off(items, size, seed=3)
    assert len(held_out) == 3 and sorted(rest + held_out) == items
    assert rest == sorted(rest) and held_out == sorted(held_out)
    assert split_off(items, size, seed=3) == (rest, held_out) != split_off(items, size, seed=4)


@pytest.mark.parametrize("size", [0, 12, 1.0, -0.5, True])
def test_split_off_rejects_sizes_that_leave_nothing(size: int | float) -> None:
    with pytest.raises(BituneInputError, match="size|leaves none"):
        split_off(list(range(12)), size)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a BituneInputError naming the file, the line/row and the field

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
TWO_GOOD_LINES = f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n"


def parquet_with_bytes(data: bytes) -> pa.Table:
    """A one-row Parquet table whose "prompt" string holds `data` unchecked (pyarrow validates nothing here)."""
    offsets = pa.py_buffer(pa.array([0, len(data)], pa.int32()).buffers()[1])
    prompt = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])
    return pa.table({"prompt": prompt, "completion": ["b"]})


# name: (file name, content, options, what the message must contain)
BAD_FILES = {
    "empty file": ("data.jsonl", b"  \n", {}, ["data.jsonl", "empty"]),
    "invalid JSON line": (
        "data.jsonl",
        TWO_GOOD_LINES + '{"output": 1,\n',
        {},
        ["data.jsonl, line 3", "invalid JSON"],
    ),
    "deep nesting": ("data.json", "[" * 100_000, {}, ["data.json, line 1", "nested too deeply"]),
    "missing field": ("data.jsonl", [GOOD, {"instruction": "x"}], {}, ["line 2", "'output' is missing"]),
    "wrong type": (
        "data.json",
        json.dumps([GOOD, {**GOOD, "output": 5}]),
        {},
        ["data.json, row 1", "'output'", "int"],
    ),
    "empty answer": (
        "data.jsonl",
        [{**GOOD, "output": " "}],
        {},
        ["line 1", "'output' is empty", "empty: drop"],
    ),
    "empty prompt": ("data.jsonl", [{**GOOD, "instruction": ""}], {}, ["line 1", "'instruction' is empty"]),
    "not UTF-8": (
        "data.jsonl",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}',
        {},
        ["line 2", "UTF-8"],
    ),
    "lone surrogate": (
        "data.jsonl",
        '{"prompt": "a\\ud800", "completion": "b"}',
        {},
        ["line 1", "'prompt'", "Unicode"],
    ),
    "not an object": ("data.json", "[{}, 3]", {}, ["data.json, row 1", "JSON object"]),
    "CSV extra value": (
        "data.csv",
        "prompt,completion\na,b\nc,d,e\n",
        {},
        ["data.csv, row 1", "more values"],
    ),
    "CSV short row": (
        "data.csv",
        "prompt,completion\na\n",
        {},
        ["data.csv, row 0", "'completion' is missing"],
    ),
    "CSV field too long": (
        "data.csv",
        f"prompt,completion\n{'x' * 140_000},y\n",
        {},
        ["data.csv, line 2", "unreadable CSV"],
    ),
    "header only": ("data.csv", "prompt,completion\n", {}, ["data.csv", "no rows"]),
    "garbage Parquet": ("data.parquet", b"PAR1 not really", {}, ["data.parquet", "Parquet"]),
    "Parquet not UTF-8": ("data.parquet", parquet_with_bytes(b"a\xff"), {}, ["data.parquet", "utf-8"]),
    "unknown suffix": ("data.txt", "hello", {}, ["data.txt", "unsupported file type"]),
    "unknown columns": ("data.jsonl", [{"text": "a"}], {}, ["line 1", "cannot tell the format", "columns"]),
    "wrong column": (
        "data.jsonl",
        [GOOD],
        {"columns": {"prompt": "q", "answer": "output"}},
        ["line 1", "'q'"],
    ),
    "bad answerKey": (
        "data.jsonl",
        [{"question": "Q?", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "C"}],
        {},
        ["line 1", "'answerKey'", "'C'"],
    ),
    "uneven choices": (
        "data.jsonl",
        [{"question": "Q?", "choices": {"label": ["A", "B"], "text": ["x"]}, "answerKey": "B"}],
        {},
        ["line 1", "'choices'", "same length"],
    ),
    "no final answer": ("data.jsonl", [chat(("user", "Hi"))], {}, ["line 1", "'messages'", "assistant"]),
    "no question": (
        "data.jsonl",
        [chat(("system", "S"), ("assistant", "A"))],
        {},
        ["'messages'", "no user turn"],
    ),
    "unknown role": (
        "data.jsonl",
        [{"conversations": [{"from": "bot", "value": "Hi"}, {"from": "gpt", "value": "x"}]}],
        {},
        ["line 1", "'conversations[0].from'", "'bot'"],
    ),
    "role not text": (
        "data.jsonl",
        [{"messages": [{"role": ["user"]}]}],
        {},
        ["'messages[0].role'", "['user']"],
    ),
    "multi-turn, plain template": (
        "data.jsonl",
        [chat(("system", "S"), ("user", "U"), ("assistant", "A"))],
        {},
        ["line 1", "template 'chat'"],
    ),
    "chat template rejects": (
        "data.jsonl",
        [chat(("user", "U"), ("system", "S"), ("assistant", "A"))],
        {"template": "chat"},
        ["line 1", "chat template", "system turns go first"],
    ),
}


@pytest.mark.parametrize(("name", "content", "options", "expected"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_input_names_file_row_and_field(
    tmp_path: Path, name: str, content: bytes | str | list | pa.Table, options: dict, expected: list[str]
) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(BituneInputError) as caught:
        load_dataset_samples(DataConfig(str(path), **options), TOKENIZER)
    for text in expected:
        assert text in str(caught.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"path": ""}, "'path'"),
        ({"format": "xml"}, "'format': 'xml' is not a known format"),
        ({"template": "llama"}, "'template': 'llama' is unknown"),
        ({"format": "columns"}, "'columns'"),
        ({"format": "alpaca", "columns": {"prompt": "a", "answer": "b"}}, "format 'columns' only"),
        ({"columns": {"prompt": "a"}}, "exactly the keys"),
        ({"columns": {"prompt": "{a!r}", "answer": "b"}}, "'columns.prompt'"),
        ({"columns": {"prompt": "{a", "answer": "b"}}, "not a valid template"),
        ({"max_length": 2}, "'max_length'"),
        ({"overlong": "cut"}, "'overlong'"),
        ({"empty": "skip"}, "'empty'"),
        ({"limit": 0}, "'limit'"),
    ],
)
def test_bad_settings_name_the_setting(options: dict, expected: str) -> None:
    with pytest.raises(BituneInputError, match="data config") as caught:
        DataConfig(**{"path": "data.jsonl", **options})
    assert expected in str(caught.value)


def test_missing_local_file_is_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    with pytest.raises(BituneInputError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


def test_chat_template_needs_a_tokenizer_with_one() -> None:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(BituneInputError, match="the tokenizer has no chat template; set data.chat_template"):
        build([GOOD], tokenizer, template="chat")
    (sample,) = build([GOOD], tokenizer, chat_template="zephyr")  # a named one needs none
    assert texts(sample, tokenizer)[0].endswith("</s>\n<|assistant|>\n")


def test_empty_rows_may_be_dropped_and_are_counted() -> None:
    records = [Record("rows.jsonl, line 1", {**GOOD, "output": ""}), Record("rows.jsonl, line 2", GOOD)]
    samples, stats = build_samples(records, TOKENIZER, DataConfig("rows.jsonl", empty="drop"))
    assert len(samples) == 1 and stats == DataStats(rows=2, samples=1, dropped_empty=1)


def test_several_sources_mix_with_their_own_format_weight_and_limit(tmp_path: Path) -> None:
    alpaca = write(tmp_path, "a.json", [{**GOOD, "instruction": f"Add {i} and 3."} for i in range(4)])
    chats = write(tmp_path, "b.jsonl", [chat(("user", f"Hi {i}"), ("assistant", "Hello")) for i in range(6)])
    config = DataConfig(
        [str(alpaca), {"path": str(chats), "format": "messages", "weight": 1.5, "limit": 4}],
        template="chat",
        seed=3,
    )
    samples, stats = load_dataset_samples(config, TOKENIZER)
    assert len(samples) == 4 + 6 and stats.samples == 10 and stats.rows == 10
    assert [(part.path, part.rows, part.samples, part.weight) for part in stats.sources] == [
        (str(alpaca), 4, 4, 1.0),
        (str(chats), 6, 6, 1.5),
    ]
    prompts = [texts(sample)[0] for sample in samples]
    assert all("Add" in prompt for prompt in prompts[:4]) and all("Hi" in prompt for prompt in prompts[4:])
    assert len(set(prompts[4:])) == 4  # the limit (4 of 6), then half of them once more
    assert load_dataset_samples(config, TOKENIZER)[0] == samples  # seeded
    halved, _ = load_dataset_samples(DataConfig([{"path": str(alpaca), "weight": 0.5}], limit=1), TOKENIZER)
    assert len(halved) == 1


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ([], "an empty list"),
        ([3], "must be a path or a mapping"),
        ([{"path": "a.jsonl", "weight": 0}], "path[0]: data source 'a.jsonl', field 'weight'"),
        ([{"path": "a.jsonl", "format": "xml"}], "field 'format'"),
        ([{"path": "a.jsonl", "wieght": 2}], "path[0]: unknown key 'wieght'"),
        ([{"weight": 2}], "path[0]: path is required"),
    ],
)
def test_bad_sources_name_the_item(path: list, expected: str) -> None:
    with pytest.raises(BituneInputError, match="data config") as caught:
        DataConfig(path)
    assert expected in str(caught.value)


def test_nothing_left_is_an_error() -> None:
    with pytest.raises(BituneInputError, match="no samples left"):
        build([{**GOOD, "output": ""}], empty="drop")


def test_csv_and_parquet_files_load_like_json(tmp_path: Path) -> None:
    rows = [{"prompt": QUESTION, "completion": ANSWER}, {"prompt": "Hi, there", "completion": "Hello"}]
    csv_path = write(tmp_path, "data.csv", f'prompt,completion\n{QUESTION},{ANSWER}\n"Hi, there",Hello\n')
    parquet_path = write(tmp_path, "data.parquet", pa.Table.from_pylist(rows))
    json_path = write(tmp_path, "data.json", json.dumps(rows))
    jsonl_as_json_path = write(tmp_path, "lines.json", rows)
    expected = build(rows)
    for path in (csv_path, parquet_path, json_path, jsonl_as_json_path):
        assert load_dataset_samples(DataConfig(str(path)), TOKENIZER)[0] == expected
    assert [r.location for r in load_records(csv_path)] == [f"{csv_path}, row 0", f"{csv_path}, row 1"]


def test_hub_datasets_go_through_datasets_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": QUESTION, "completion": ANSWER}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    samples, _ = load_dataset_samples(DataConfig("someone/qa", split="test"), TOKENIZER)
    assert calls == [("someone/qa", "test")] and texts(samples[0]) == PLAIN
    assert load_records("someone/qa", "test")[0].location == "someone/qa [test], row 0"


def test_unreachable_hub_dataset_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, split: str) -> None:
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BituneInputError, match="'someone/qa' is no local file.*Couldn't reach"):
        load_records("someone/qa")


# ----------------------------------------------------------------------------------------------------------
# Junk: valid samples or BituneInputError, never anything else

FIELD_NAMES = ["instruction", "input", "output", "prompt", "completion", "question", "answer", "answerKey",
               "choices", "messages", "conversations", "role", "content", "from", "value", "label", "text"]  # fmt: skip
NAMES_OR_BLANK = st.sampled_from(FIELD_NAMES + ["", " ", "A", "user", "gpt"])
TEXT = (
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | NAMES_OR_BLANK
)  # with surrogates
CLEAN_TEXT = st.text(max_size=12) | NAMES_OR_BLANK
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | TEXT, inner, max_size=5)
    ),
    max_leaves=12,
)
# Valid rows of every shape; test_random_rows then puts junk in up to two places, at any depth.
WORDS = st.from_regex(r"[a-z][a-z ]{0,8}", fullmatch=True)
CONVERSATIONS = st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=2).map(
    lambda pairs: [turn for question, answer in pairs for turn in (("user", question), ("assistant", answer))]
)
VALID_ROWS = [
    st.fixed_dictionaries({"instruction": WORDS, "output": WORDS}, optional={"input": WORDS | st.just("")}),
    st.fixed_dictionaries({"prompt": WORDS, "completion": WORDS}),
    st.fixed_dictionaries({"question": WORDS, "answer": WORDS}),
    st.builds(
        lambda question, texts, key: {
            "question": question,
            "choices": {"label": ["A", "B"], "text": texts},
            "answerKey": key,
        },
        WORDS,
        st.lists(WORDS, min_size=1, max_size=3),
        st.sampled_from("AB"),
    ),
    CONVERSATIONS.map(lambda turns: chat(*turns)),
    CONVERSATIONS.map(
        lambda turns: {
            "conversations": [{"from": {"user": "human"}.get(r, "gpt"), "value": c} for r, c in turns]
        }
    ),
]
JUNK_EDITS = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), JSON_VALUES), max_size=2)
CONFIGS = st.fixed_dictionaries(
    {
        "format": st.just("auto") | st.sampled_from(FORMATS),
        "template": st.sampled_from(["plain", "chat", "{prompt}", "<{prompt}>\n"]),
        "max_length": st.integers(4, 80),
        "overlong": st.sampled_from(["drop", "truncate"]),
        "empty": st.sampled_from(["error", "drop"]),
    }
)


def check_loader(name: str, content: bytes | str | pa.Table, options: dict) -> bool:
    """Load junk: valid samples or a BituneInputError; returns whether samples came back."""
    if options["format"] == "columns":
        options = {**options, "columns": {"prompt": "question", "answer": "{answer}!"}}
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), name, content)
        try:
            samples, stats = load_dataset_samples(DataConfig(str(path), **options), TOKENIZER)
        except BituneInputError:
            return False
    assert stats.samples == len(samples) > 0
    for sample in samples:
        assert sample.prompt_ids[0] == BOS and len(sample.prompt_ids) >= 2 and sample.answer_ids[-1] == EOS
        assert len(sample.prompt_ids) + len(sample.answer_ids) <= options["max_length"]
    return True


def objects_in(value: object) -> list[dict]:
    if isinstance(value, dict):
        return [value] + [found for item in value.values() for found in objects_in(item)]
    return [found for item in value for found in objects_in(item)] if isinstance(value, list) else []


JUNK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@JUNK
@given(
    name=st.sampled_from(["d.json", "d.jsonl", "d.csv", "d.parquet"]),
    content=st.binary(max_size=200),
    config=CONFIGS,
)
def test_random_bytes(name: str, content: bytes, config: dict) -> None:
    check_loader(name, content, config)


@JUNK
@given(values=st.lists(JSON_VALUES, max_size=4), as_list=st.booleans(), config=CONFIGS)
def test_random_json_values(values: list, as_list: bool, config: dict) -> None:
    check_loader("d.json", json.dumps(values) if as_list else "\n".join(map(json.dumps, values)), config)


@settings(JUNK, max_examples=200)
@given(
    rows=st.sampled_from(VALID_ROWS).flatmap(lambda row: st.lists(row, min_size=1, max_size=4)),
    edits=JUNK_EDITS,
    config=CONFIGS,
)
def test_random_rows(rows: list[dict], edits: list[tuple[int, int, object]], config: dict) -> None:
    for where, which, value in edits:
        objects = [found for row in rows for found in objects_in(row)]  # rows, turns, choices
        target = objects[where % len(objects)]
        names = [*target, *FIELD_NAMES]  # small numbers (which Hypothesis favours) replace existing fields
        target[names[which % len(names)]] = value
    loaded = check_loader("d.jsonl", "\n".join(map(json.dumps, rows)), config)
    event("samples" if loaded else "BituneInputError")  # `pytest --hypothesis-show-statistics` shows the mix


@JUNK
@given(
    rows=st.lists(
        st.dictionaries(st.sampled_from(FIELD_NAMES), CLEAN_TEXT, max_size=4), min_size=1, max_size=4
    ),
    config=CONFIGS,
)
def test_random_csv_and_parquet_rows(rows: list[dict], config: dict) -> None:
    names = sorted({name for row in rows for name in row}) or ["text"]
    lines = [",".join(names)] + [",".join(json.dumps(row.get(n, "")) for n in names) for row in rows]
    check_loader("d.csv", "\n".join(lines), config)
    check_loader("d.parquet", pa.Table.from_pylist([{n: row.get(n) for n in names} for row in rows]), config)


# ----------------------------------------------------------------------------------------------------------
# The real data sets

REAL = {
    "instruct/alpaca_gpt4_999.json": (999, {}),
    "instruct/alpaca_5000.json": (5000, {"empty": "drop"}),  # 2 rows have an empty output
    "gsm8k/train.jsonl": (7473, {}),
    "commonsense_qa/train.jsonl": (9741, {}),
    "arc_easy/train.jsonl": (2251, {}),
    "arc_challenge/train.jsonl": (1119, {}),
    "flan_cot/aqua.jsonl": (2728, {}),
    "flan_cot/creak.jsonl": (6915, {}),
    "flan_cot/ecqa.jsonl": (7112, {}),
    "flan_cot/gsm8k.jsonl": (7473, {}),
    "flan_cot/qasc.jsonl": (1084, {}),
    "flan_cot/sensemaking.jsonl": (6070, {}),
    "flan_cot/strategyqa.jsonl": (2061, {}),
}


@pytest.fixture(scope="module")
def real_tokenizer(shared_data: Path) -> PreTrainedTokenizerFast:
    """Trained on a slice of the real data, so tokens are about word-sized, as with a real model's tokenizer."""
    corpus = [line for name in REAL for line in (shared_data / name).read_text().splitlines()[:100]]
    return make_tokenizer(corpus=corpus, vocab_size=2000)


@pytest.mark.parametrize(("name", "rows", "options"), [(k, *v) for k, v in REAL.items()], ids=REAL.keys())
def test_real_data_sets(
    shared_data: Path, real_tokenizer: PreTrainedTokenizerFast, name: str, rows: int, options: dict
) -> None:
    config = DataConfig(str(shared_data / name), max_length=100_000, **options)
    samples, stats = load_dataset_samples(config, real_tokenizer)
    assert stats.rows == rows and len(samples) == rows - stats.dropped_empty
    assert stats.dropped_empty == (2 if name == "instruct/alpaca_5000.json" else 0)
    assert all(s.prompt_ids[0] == BOS and s.answer_ids[-1] == EOS for s in samples)
    assert not any(BOS in s.prompt_ids[1:] or EOS in s.answer_ids[:-1] for s in samples)


def test_real_first_rows_read_right(shared_data: Path) -> None:
    def first(name: str, **options) -> tuple[str, str]:
        config = DataConfig(str(shared_data / name), **options)
        return texts(build_samples(load_records(config.path)[:1], TOKENIZER, config)[0][0])

    csqa_prompt, csqa_answer = first("commonsense_qa/train.jsonl")
    assert csqa_prompt.endswith("\n\nChoices:\nignore\nenforce\nauthoritarian\nyell at\navoid\n\nAnswer:")
    assert csqa_answer == " ignore</s>"
    assert first("gsm8k/train.jsonl")[1].endswith("#### 72</s>")
    columns = {"prompt": "question", "answer": "{rationale} The answer is {answer}."}
    cot = first("flan_cot/gsm8k.jsonl", columns=columns)
    assert cot[1].endswith("altogether in April and May. The answer is 72.</s>")
    prompt, answer = first("instruct/alpaca_5000.json", template="chat")
    assert prompt.startswith("<s><|user|>Are the two sentences below grammatically correct?")
    assert answer == "No</s>"


def test_real_empty_outputs_are_reported_by_default(shared_data: Path) -> None:
    with pytest.raises(BituneInputError, match=r"alpaca_5000\.json, row 2335: field 'output' is empty"):
        load_dataset_samples(DataConfig(str(shared_data / "instruct/alpaca_5000.json")), TOKENIZER)


def test_real_overlong_samples(shared_data: Path, real_tokenizer: PreTrainedTokenizerFast) -> None:
    path = str(shared_data / "arc_challenge/train.jsonl")
    kept, dropped = load_dataset_samples(DataConfig(path, max_length=64), real_tokenizer)
    cut, truncated = load_dataset_samples(
        DataConfig(path, max_length=64, overlong="truncate"), real_tokenizer
    )
    assert dropped.dropped_overlong == truncated.truncated > 0
    assert len(kept) + dropped.dropped_overlong == len(cut) == 1119
    assert max(len(s.prompt_ids) + len(s.answer_ids) for s in kept + cut) == 64
