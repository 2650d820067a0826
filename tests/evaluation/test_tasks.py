"""Task loading: real benchmark files end to end, exact prompts, bad rows, spec files, and agreement with lm-eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from task_shapes import SHAPES, docs_spec, write_shapes, write_stock_tasks

from bitune.errors import BituneInputError
from bitune.evaluation.tasks import (
    STOP_SEQUENCES,
    TASK_NAMES,
    GenerationItem,
    MultipleChoiceItem,
    export_lm_eval_task,
    load_task,
)

LM_EVAL_TASKS = Path(pytest.importorskip("lm_eval").__file__).parent / "tasks"

SPLITS = {
    "piqa": "validation",
    "arc_challenge": "test",
    "arc_easy": "test",
    "commonsense_qa": "validation",
    "social_i_qa": "validation",
    "mmlu": "test",
    "gsm8k": "test",
}
# rows, option counts, items whose gold is the first option, groups (README table of ../shared/data)
EXPECTED = {
    "piqa": (1838, {2}, 910, 0),
    "arc_challenge": (1172, {3, 4, 5}, 266, 0),
    "arc_easy": (2376, {3, 4, 5}, 596, 0),
    "commonsense_qa": (1221, {5}, 239, 0),
    "social_i_qa": (1954, {3}, 643, 0),
    "mmlu": (14042, {4}, 3222, 57),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    # split on "\n" only: some MMLU questions hold U+2028, which splitlines() would split on
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# ------------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize("style", ["full", "plain"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_multiple_choice_tasks_read_the_real_files(shared_data: Path, name: str, style: str) -> None:
    rows, option_counts, first_option_gold, num_groups = EXPECTED[name]
    task = load_task(name, data_dir=shared_data, style=style)

    assert (task.name, task.kind, task.style, task.split) == (name, "multiple_choice", style, SPLITS[name])
    assert task.source == str(shared_data / name / f"{SPLITS[name]}.jsonl")
    assert len(task.items) == rows
    assert len({item.id for item in task.items}) == rows
    assert {len(item.choices) for item in task.items} == option_counts
    assert all(0 <= item.gold < len(item.choices) for item in task.items)
    assert sum(item.gold == 0 for item in task.items) == first_option_gold
    assert all(item.continuations == [" " + choice for choice in item.choices] for item in task.items)
    assert len(task.groups) == num_groups


def test_gsm8k_reads_the_real_file(shared_data: Path) -> None:
    task = load_task("gsm8k", data_dir=shared_data)

    assert (task.kind, task.split, len(task.items)) == ("generation", "test", 1319)
    assert all(re.fullmatch(r"-?[0-9,]+", item.target) for item in task.items)
    assert task.items[0].target == "18"
    assert "2,125" in {item.target for item in task.items}  # the number is kept as written; metrics normalise
    assert task.stop_sequences == STOP_SEQUENCES and task.max_new_tokens == 256


def test_mmlu_groups_are_the_subjects(shared_data: Path) -> None:
    task = load_task("mmlu", data_dir=shared_data)
    per_subject = {group: sum(item.group == group for item in task.items) for group in task.groups}

    assert per_subject["abstract_algebra"] == 100
    assert per_subject["high_school_european_history"] == 165
    assert sum(per_subject.values()) == 14042


def test_gold_points_at_the_right_option(shared_data: Path) -> None:
    arc = load_task("arc_challenge", data_dir=shared_data, limit=1).items[0]  # answerKey "C"
    siqa = load_task("social_i_qa", data_dir=shared_data, limit=1).items[0]  # label "3"
    csqa = load_task("commonsense_qa", data_dir=shared_data, style="plain", limit=1).items[0]  # answerKey "A"

    assert arc.choices[arc.gold] == "Planetary days will become shorter."
    assert siqa.choices[siqa.gold] == "Find somewhere to go"
    assert csqa.choices[csqa.gold] == "A"


def test_limit_reads_the_first_rows(shared_data: Path) -> None:
    task = load_task("piqa", data_dir=shared_data, limit=3)

    assert [item.id for item in task.items] == ["piqa-0", "piqa-1", "piqa-2"]
    assert task.items[1].context.startswith("Question: dresser\n")


# ------------------------------------------------------------------------------------------ exact prompts


def test_full_style_lists_the_options(shared_data: Path) -> None:
    siqa = load_task("social_i_qa", data_dir=shared_data, limit=1).items[0]
    mmlu = load_task("mmlu", data_dir=shared_data, limit=1).items[0]
    gsm8k = load_task("gsm8k", data_dir=shared_data, limit=2).items[1]

    assert siqa.context == (
        "Question: Tracy didn't go home that evening and resisted Riley's attacks. "
        "What does Tracy need to do before this?\n\n"
        "Choices:\nmake a new plan\nGo home and see Riley\nFind somewhere to go\n\nAnswer:"
    )
    assert siqa.continuations == [" make a new plan", " Go home and see Riley", " Find somewhere to go"]
    assert mmlu.context == (
        "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n\n"
        "Choices:\n0\n4\n2\n6\n\nAnswer:"
    )
    assert gsm8k.prompt == (
        "Question: A robe takes 2 bolts of blue fiber and half that much white fiber.  "
        "How many bolts in total does it take?\n\nAnswer:"
    )


def test_full_style_strips_the_question_but_not_the_options(tmp_path: Path) -> None:
    row = {"question": "  Which?\n", "subject": "x", "choices": ["a ", "b", "c", "d"], "answer": 0}
    item = load_task("mmlu", path=write_jsonl(tmp_path / "m.jsonl", [row])).items[0]

    assert item.context == "Question: Which?\n\nChoices:\na \nb\nc\nd\n\nAnswer:"
    assert item.continuations[0] == " a "


def test_plain_style_uses_lm_eval_prompts(shared_data: Path) -> None:
    piqa = load_task("piqa", data_dir=shared_data, style="plain", limit=2).items[1]
    siqa = load_task("social_i_qa", data_dir=shared_data, style="plain", limit=1).items[0]
    csqa = load_task("commonsense_qa", data_dir=shared_data, style="plain", limit=1).items[0]
    gsm8k = load_task("gsm8k", data_dir=shared_data, style="plain", limit=2).items[1]

    assert (piqa.context, piqa.choices) == (
        "Question: dresser\nAnswer:",
        ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "],
    )
    assert siqa.context.startswith("Q: Tracy didn't go home that evening and resisted Riley's attacks. What")
    assert siqa.context.endswith("before this?\nA:")
    assert csqa.context == (
        "Question: A revolving door is convenient for two direction travel, but it also serves as a security "
        "measure at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:"
    )
    assert csqa.continuations == [" A", " B", " C", " D", " E"]
    assert gsm8k.prompt.endswith("How many bolts in total does it take?\nAnswer:")


def test_mmlu_plain_description_matches_every_lm_eval_subject(shared_data: Path) -> None:
    task = load_task("mmlu", data_dir=shared_data, style="plain")
    first_item = {}
    for item in task.items:
        first_item.setdefault(item.group, item)

    for subject, item in first_item.items():
        stock = yaml.safe_load((LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml").read_text())
        assert item.context.startswith(stock["description"])
    assert len(first_item) == 57


# ------------------------------------------------------------------------------------------ bad input


def piqa_row(**changes: object) -> dict:
    return {"goal": "g", "sol1": "a", "sol2": "b", "label": 0, **changes}


@pytest.mark.parametrize(
    ("task", "bad_row", "field", "problem"),
    [
        ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "sol2", "missing"),
        ("piqa", piqa_row(label=2), "label", "out of range for 2 options"),
        ("piqa", piqa_row(label="first"), "label", "0-based index"),
        ("piqa", piqa_row(sol1=""), "sol1, sol2", "option 1 is empty"),
        ("piqa", piqa_row(goal=7), "goal", "expected text"),
        (
            "commonsense_qa",
            {"question": "q", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "A"},
            "choices.text",
            "expected 5 options, found 2",
        ),
        (
            "arc_easy",
            {
                "question": "q",
                "choices": {"label": ["A", "B", "C"], "text": ["x", "y", "z"]},
                "answerKey": "D",
            },
            "answerKey",
            "not one of the labels A, B, C",
        ),
        (
            "arc_easy",
            {"question": "q", "choices": {"label": ["A", "B"], "text": ["x", "y", "z"]}, "answerKey": "A"},
            "choices.label",
            "2 labels for 3 options",
        ),
        (
            "mmlu",
            {"question": "q", "subject": "s", "choices": ["a", "b", "c"], "answer": 0},
            "choices",
            "4 options",
        ),
        (
            "social_i_qa",
            {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "4"},
            "label",
            "not one of the labels 1, 2, 3",
        ),
        ("gsm8k", {"question": "q", "answer": "it is 4"}, "answer", "no '####'"),
    ],
)
def test_a_bad_row_names_file_line_and_field(
    shared_data: Path, tmp_path: Path, task: str, bad_row: dict, field: str, problem: str
) -> None:
    good_rows = (shared_data / task / f"{SPLITS[task]}.jsonl").read_text(encoding="utf-8").split("\n")[:2]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join([*good_rows, "", json.dumps(bad_row)]) + "\n")  # the bad row is line 4

    with pytest.raises(BituneInputError) as raised:
        load_task(task, path=data)

    message = str(raised.value)
    assert message.startswith(f"{data}, line 4, field '{field}': ")
    assert problem in message


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(piqa_row()) + "\n{not json\n")

    with pytest.raises(BituneInputError, match=rf"{re.escape(str(data))}, line 2: invalid JSON"):
        load_task("piqa", path=data)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": "hellaswag"}, "Unknown task 'hellaswag'"),
        ({"name": "piqa", "style": "fancy"}, "Unknown prompt style 'fancy'"),
        ({"name": "piqa", "data_dir": "x", "path": "y.jsonl"}, "either data_dir or path"),
        ({"name": "piqa", "limit": -1}, "limit"),
        ({"name": "piqa", "path": "missing.jsonl"}, "missing.jsonl: no such data file"),
        ({"name": "missing_spec.yaml"}, "missing_spec.yaml: no such task spec file"),
    ],
)
def test_bad_arguments_are_input_errors(arguments: dict, message: str) -> None:
    with pytest.raises(BituneInputError, match=re.escape(message)):
        load_task(**arguments)


def test_a_missing_split_file_says_what_data_dir_must_hold(tmp_path: Path) -> None:
    with pytest.raises(BituneInputError, match=r"piqa/train\.jsonl: no such file\. data_dir must hold"):
        load_task("piqa", data_dir=tmp_path, split="train")


# ------------------------------------------------------------------------------------------ the hub


def test_without_local_files_the_hub_dataset_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path: str, name: str | None, *, split: str, revision: str | None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([piqa_row(goal=f"goal {i}") for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("piqa", limit=3)

    assert calls == [("ybisk/piqa", None, "validation", "refs/convert/parquet")]
    assert [item.context for item in task.items][-1] == "Question: goal 2\n\nChoices:\na\nb\n\nAnswer:"
    assert task.source == "ybisk/piqa (validation)"


def test_local_files_never_touch_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    assert len(load_task("piqa", path=write_jsonl(tmp_path / "p.jsonl", [piqa_row()])).items) == 1
    with pytest.raises(BituneInputError):
        load_task("piqa", path=tmp_path / "absent.jsonl")


# ------------------------------------------------------------------------------------------ task specs


def write_spec(folder: Path, spec: dict, name: str = "quiz.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec) if name.endswith(".yaml") else json.dumps(spec))
    return path


def test_spec_with_a_list_field_and_per_row_labels(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "quiz.jsonl",
        [
            {
                "q": {"text": "2+2?"},
                "opts": {"label": ["x", "y"], "text": ["4", "5"]},
                "key": "x",
                "topic": "math",
            }
        ],
    )
    spec = write_spec(
        tmp_path,
        {"data": "quiz.jsonl", "question": "q.text", "choices": "opts.text", "labels": "opts.label",
         "answer": "key", "group": "topic"},
    )  # fmt: skip

    task = load_task(spec, style="plain")

    assert (task.name, task.kind, task.source) == ("quiz", "multiple_choice", str(tmp_path / "quiz.jsonl"))
    assert task.items == [MultipleChoiceItem("quiz-0", "Question: 2+2?\nAnswer:", ["4", "5"], 0, "math")]


def test_spec_with_choice_fields_fixed_labels_and_a_template_over_csv(tmp_path: Path) -> None:
    (tmp_path / "quiz.csv").write_text('situation,ask,one,two,gold\nA cat,"Sound, please?",meow,woof,2\n')
    spec = write_spec(
        tmp_path,
        {"name": "animals", "data": "quiz.csv", "question": ["situation", "ask"], "choices": ["one", "two"],
         "labels": [1, 2], "answer": "gold", "template": "Q: {question}\nOptions:\n{choices}\nA:"},
        name="spec.json",
    )  # fmt: skip

    item = load_task(spec).items[0]

    assert item == MultipleChoiceItem(
        "animals-0", "Q: A cat Sound, please?\nOptions:\nmeow\nwoof\nA:", ["meow", "woof"], 1
    )


def test_spec_gold_index_from_csv_text(tmp_path: Path) -> None:
    (tmp_path / "quiz.csv").write_text("q,a,b,answer\nWhich?,x,y,1\nOr?,x,y,2\n")
    spec = write_spec(
        tmp_path, {"data": "quiz.csv", "question": "q", "choices": ["a", "b"], "answer": "answer"}
    )

    assert load_task(spec, limit=1).items[0].gold == 1
    with pytest.raises(BituneInputError, match=r"quiz\.csv, row 1, field 'answer': answer 2 is out of range"):
        load_task(spec)


def test_generation_spec(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "sums.jsonl", [{"problem": "1+1?", "solution": "one and one\n#### 2"}])
    spec = write_spec(
        tmp_path, {"kind": "generation", "data": "sums.jsonl", "question": "problem", "answer": "solution",
                   "answer_delimiter": "####"},
    )  # fmt: skip

    assert load_task(spec).items == [GenerationItem("quiz-0", "Question: 1+1?\n\nAnswer:", "2")]
    assert load_task(spec, style="plain").items[0].prompt == "Question: 1+1?\nAnswer:"


@pytest.mark.parametrize(
    ("spec", "key", "problem"),
    [
        ({"question": "q", "choices": "c", "answer": "a"}, "data", "required"),
        ({"data": "d.jsonl", "question": "q", "answer": "a"}, "choices", "needs choices"),
        ({"data": "d.jsonl", "question": "q", "choices": "c", "fixed_choices": ["x", "y"], "answer": "a"}, "choices",
         "one of the two"),
        ({"data": "d.jsonl", "question": "q", "choices": [False, True], "answer": "a"}, "choices", "fixed_choices"),
        ({"data": "d.jsonl", "question": "q", "fixed_choices": [False, True], "answer": "a"}, "fixed_choices",
         "quote"),
        ({"data": "d.jsonl", "question": "q", "fixed_choices": ["x"], "answer": "a"}, "fixed_choices", "at least 2"),
        ({"data": "d.jsonl", "choices": "c", "answer": "a", "template": "{{q}"}, "template", "not a valid Jinja"),
        ({"data": "d.jsonl", "choices": "c", "answer": "a", "template": "Q: {question}"}, "question", "unless"),
        ({"data": "d.jsonl", "question": "q", "choices": "c", "answer": "a", "blank": "_", "template": "{question}"},
         "template", "Jinja"),
        ({"data": "d.jsonl", "question": "q", "answer": "a", "kind": "generation", "blank": "_"}, "blank",
         "only for multiple_choice"),
        ({"data": "d.jsonl", "question": "q", "choices": "c", "answer": "a", "gold": 1}, "gold", "unknown key"),
        ({"data": "d.jsonl", "question": "q", "choices": "c", "answer": "a", "kind": "rank"}, "kind", "expected"),
        ({"data": "d.jsonl", "question": "q", "choices": "c", "answer": "a", "template": "{prompt}"}, "template",
         "placeholders"),
        ({"data": "d.jsonl", "question": "q", "choices": "c", "answer": "a", "template": "{question"}, "template",
         "not a valid format string"),
        ({"data": "d.jsonl", "question": "q", "answer": "a", "kind": "generation", "choices": "c"}, "choices",
         "only for multiple_choice"),
        ({"data": "d.jsonl", "question": [], "choices": "c", "answer": "a"}, "question", "field name"),
        ({"data": "d.jsonl", "question": "q", "choices": "c", "answer": "a", "name": "a b"}, "name", "letters"),
    ],
)  # fmt: skip
def test_bad_spec_names_file_and_key(tmp_path: Path, spec: dict, key: str, problem: str) -> None:
    path = write_spec(tmp_path, spec)

    with pytest.raises(BituneInputError) as raised:
        load_task(path)

    assert str(raised.value).startswith(f"{path}, key '{key}': ")
    assert problem in str(raised.value)


def test_spec_yes_and_no_are_text_and_fixed_choices_need_no_quotes(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "Is ice cold?", "gold": "yes", "flag": True}])
    path = tmp_path / "qa.yaml"
    path.write_text(
        "data: qa.jsonl\nquestion: q\nfixed_choices: [no, yes]\nanswer: gold\nlabels: [no, yes]\n"
    )
    assert load_task(path).items == [
        MultipleChoiceItem("qa-0", "Question: Is ice cold?\n\nChoices:\nno\nyes\n\nAnswer:", ["no", "yes"], 1)
    ]
    # a JSON boolean answer matches boolean labels
    path.write_text(
        "data: qa.jsonl\nquestion: q\nfixed_choices: [wrong, right]\nanswer: flag\nlabels: [false, true]\n"
    )
    assert load_task(path).items[0].gold == 1
    # quoted choices name fields: a missing one points to fixed_choices
    path.write_text('data: qa.jsonl\nquestion: q\nchoices: ["no", "yes"]\nanswer: gold\n')
    with pytest.raises(
        BituneInputError, match=r"qa\.jsonl, line 1, field 'no': missing .*fixed_choices: \[no, yes\]"
    ):
        load_task(path)


def test_blank_and_jinja_problems_name_the_row(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "w.jsonl", [{"s": "No blank here.", "a": "x", "b": "y", "i": 0}])
    spec = write_spec(
        tmp_path, {"data": "w.jsonl", "question": "s", "choices": ["a", "b"], "answer": "i", "blank": "_"}
    )
    with pytest.raises(BituneInputError, match=r"w\.jsonl, line 1, field 's': no blank '_'"):
        load_task(spec)
    spec = write_spec(
        tmp_path,
        {"data": "w.jsonl", "template": "{{ s }} {{ missing }}", "choices": ["a", "b"], "answer": "i"},
    )
    with pytest.raises(
        BituneInputError, match=r"w\.jsonl, line 1, field 'template': the Jinja template fails .*missing"
    ):
        load_task(spec)


# a row for each of docs/tasks.md's other examples, and the item it gives
DOCS_EXAMPLES = {
    "arc_like": ({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
                  "answerKey": "B"}, "Question: Which is a gas?\n\nChoices:\nice\nsteam\n\nAnswer:", 1),
    "piqa_like": ({"goal": "Dry a towel.", "sol1": "Hang it.", "sol2": "Wet it.", "label": 0},
                  "Question: Dry a towel.\nAnswer:", 0),
    "mmlu_like": ({"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
                  "Question: 2+2?\n\nChoices:\n3\n4\n5\n6\n\nAnswer:", 1),
}  # fmt: skip


@pytest.mark.parametrize("name", DOCS_EXAMPLES)
def test_the_docs_examples_load(tmp_path: Path, name: str) -> None:
    row, context, gold = DOCS_EXAMPLES[name]
    write_jsonl(tmp_path / f"{name}.jsonl", [row])
    (tmp_path / f"{name}.yaml").write_text(docs_spec(name))
    (item,) = load_task(tmp_path / f"{name}.yaml").items
    assert (item.context, item.gold) == (context, gold)
    write_jsonl(tmp_path / "gsm8k_like.jsonl", [{"question": "1+1?", "answer": "One and one.\n#### 2"}])
    (tmp_path / "gsm8k_like.yaml").write_text(docs_spec("gsm8k_like"))
    assert load_task(tmp_path / "gsm8k_like.yaml").items[0].target == "2"


def test_partial_scoring_items_score_each_option_s_context_on_the_shared_rest(tmp_path: Path) -> None:
    specs = write_shapes(tmp_path)
    item = load_task(specs["winogrande"]).items[1]
    assert item.requests == [
        ("The trophy doesn't fit into the brown suitcase because the trophy", " is too large."),
        ("The trophy doesn't fit into the brown suitcase because the suitcase", " is too large."),
    ]
    assert (item.context, item.gold, item.continuation) == ("", 0, "is too large.")


# ------------------------------------------------------------------------------------------ lm-eval agreement


def lm_eval_requests(task) -> list[tuple]:
    task.build_all_requests(limit=None)
    return [inst.arguments for inst in sorted(task.instances, key=lambda inst: (inst.doc_id, inst.idx))]


def our_requests(items: list) -> list[tuple]:
    if isinstance(items[0], GenerationItem):
        return [item.prompt for item in items]
    return [request for item in items for request in item.requests]


# stock lm-eval task YAML, and the rows of our data file it is checked on
STOCK = {
    "piqa": ("piqa/piqa.yaml", lambda rows: rows[:15]),
    "arc_challenge": ("arc/arc_challenge.yaml", lambda rows: rows[:10] + [r for r in rows if len(r["choices"]["text"]) != 4]),
    "commonsense_qa": ("commonsense_qa/default.yaml", lambda rows: rows[:15]),
    "social_i_qa": ("siqa/siqa.yaml", lambda rows: rows[:15]),
    "mmlu": ("mmlu/default/mmlu_moral_disputes.yaml", lambda rows: [r for r in rows if r["subject"] == "moral_disputes"][:40]),
    "gsm8k": ("gsm8k/gsm8k.yaml", lambda rows: rows[:10]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(STOCK))
def test_plain_style_matches_stock_lm_eval_tasks(
    shared_data: Path, tmp_path: Path, lm_eval_task_manager, name: str
) -> None:
    stock_yaml, pick = STOCK[name]
    rows = pick(read_jsonl(shared_data / name / f"{SPLITS[name]}.jsonl"))
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    config = {
        "include": str(LM_EVAL_TASKS / stock_yaml),
        "task": f"stock_{name}",
        "dataset_path": "json",
        "dataset_name": None,  # only the stock data file is swapped for ours
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
        "fewshot_split": None,
        "num_fewshot": 0,
    }
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "stock.yaml").write_text(yaml.safe_dump(config))

    lm_eval_task = lm_eval_task_manager(tmp_path / "tasks").load([f"stock_{name}"])["tasks"][f"stock_{name}"]
    ours = load_task(name, path=data, style="plain")

    if ours.kind == "generation":
        requests = lm_eval_requests(lm_eval_task)
        assert [context for context, _ in requests] == our_requests(ours.items)
        assert all(kwargs["until"] == list(ours.stop_sequences) for _, kwargs in requests)
    else:
        assert lm_eval_requests(lm_eval_task) == our_requests(ours.items)
        golds = [lm_eval_task.doc_to_target(doc) for doc in lm_eval_task.eval_docs]
        choices = [lm_eval_task.doc_to_choice(doc) for doc in lm_eval_task.eval_docs]
        assert [c.index(g) if isinstance(g, str) else g for c, g in zip(choices, golds, strict=True)] == [
            item.gold for item in ours.items
        ]


def test_each_new_spec_shape_asks_what_lm_eval_s_own_task_asks(tmp_path: Path, lm_eval_task_manager) -> None:
    """Fixed options (BoolQ), a blank (WinoGrande), endings (HellaSwag): the docs/tasks.md specs give lm-eval's
    own tasks' requests and golds on the same rows, and exported they give stock lm-eval the same requests."""
    specs = write_shapes(tmp_path / "data")
    stock = write_stock_tasks(tmp_path / "stock", tmp_path / "data", LM_EVAL_TASKS)
    ours = {name: load_task(specs[name]) for name in SHAPES}
    exported = {name: export_lm_eval_task(ours[name], tmp_path / "stock") for name in SHAPES}

    loaded = lm_eval_task_manager(tmp_path / "stock").load([*stock.values(), *exported.values()])["tasks"]
    for name in SHAPES:
        for lm_eval_task in (loaded[stock[name]], loaded[exported[name]]):
            assert lm_eval_requests(lm_eval_task) == our_requests(ours[name].items), name
            docs = list(lm_eval_task.eval_docs)
            golds = [
                lm_eval_task.doc_to_text(doc)
                if lm_eval_task.multiple_input
                else lm_eval_task.doc_to_target(doc)
                for doc in docs
            ]
            assert golds == [item.gold for item in ours[name].items], name
            choices = [lm_eval_task.doc_to_choice(doc) for doc in docs]
            assert choices == [item.choices for item in ours[name].items], name  # what acc_norm divides by


@pytest.mark.parametrize("style", ["full", "plain"])
def test_exported_tasks_give_lm_eval_our_exact_requests(
    shared_data: Path, tmp_path: Path, lm_eval_task_manager, style: str
) -> None:
    piqa = load_task("piqa", data_dir=shared_data, style=style, limit=6)
    arc = load_task("arc_challenge", data_dir=shared_data, style=style, limit=6)
    gsm8k = load_task("gsm8k", data_dir=shared_data, style=style, limit=4)
    mmlu = load_task("mmlu", data_dir=shared_data, style=style)
    mmlu.items = [item for item in mmlu.items if item.group in ("anatomy", "virology")][::15]
    folder = tmp_path / "exported"

    names = [export_lm_eval_task(task, folder) for task in (piqa, arc, gsm8k, mmlu)]
    loaded = lm_eval_task_manager(folder).load(names)

    assert names == [f"bitune_{name}_{style}" for name in ("piqa", "arc_challenge", "gsm8k", "mmlu")]
    for task in (piqa, arc):
        assert lm_eval_requests(loaded["tasks"][f"bitune_{task.name}_{style}"]) == our_requests(task.items)
    generation_requests = lm_eval_requests(loaded["tasks"][f"bitune_gsm8k_{style}"])
    assert [prompt for prompt, _ in generation_requests] == our_requests(gsm8k.items)
    assert generation_requests[0][1]["until"] == list(STOP_SEQUENCES)
    assert loaded["group_map"] == {
        f"bitune_mmlu_{style}": [f"bitune_mmlu_{style}_anatomy", f"bitune_mmlu_{style}_virology"]
    }
    for subject in ("anatomy", "virology"):
        items = [item for item in mmlu.items if item.group == subject]
        assert lm_eval_requests(loaded["tasks"][f"bitune_mmlu_{style}_{subject}"]) == our_requests(items)


def test_export_writes_absolute_data_paths(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "q.jsonl", [{"q": "?", "a": "x", "b": "y", "i": 1}])
    spec = write_spec(tmp_path, {"data": "q.jsonl", "question": "q", "choices": ["a", "b"], "answer": "i"})
    task = load_task(spec)

    name = export_lm_eval_task(task, tmp_path / "out", task_name="my_quiz")
    config = yaml.safe_load((tmp_path / "out" / "my_quiz.yaml").read_text())

    assert name == "my_quiz"
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(
        (tmp_path / "out" / "my_quiz.jsonl").resolve()
    )
    assert (config["output_type"], config["target_delimiter"], config["num_fewshot"]) == (
        "multiple_choice",
        " ",
        0,
    )
    assert read_jsonl(tmp_path / "out" / "my_quiz.jsonl") == [
        {
            "id": "quiz-0",
            "context": "Question: ?\n\nChoices:\nx\ny\n\nAnswer:",
            "choices": ["x", "y"],
            "gold": 1,
        }
    ]


def test_every_builtin_task_is_covered() -> None:
    assert set(TASK_NAMES) == set(SPLITS) == set(EXPECTED) | {"gsm8k"}
