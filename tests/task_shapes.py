"""The task-spec shapes lm-eval has stock tasks for (BoolQ: fixed options, WinoGrande: a blank to fill,
HellaSwag: endings of a passage): a few rows in each hub data set's schema, the specs of docs/tasks.md for them,
and lm-eval's own task YAMLs pointed at the same rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Rows in the schema of aps/super_glue boolq, allenai/winogrande and Rowan/hellaswag (two WikiHow rows with
# the [header]/[title]/[step] marks lm-eval's hellaswag removes).
ROWS = {
    "boolq": [
        {"idx": 0, "question": "is the sun a star", "label": 1,
         "passage": "The Sun is the star at the center of the Solar System. It is a nearly perfect ball of hot plasma."},
        {"idx": 1, "question": "can penguins fly", "label": 0,
         "passage": "Penguins are a group of aquatic flightless birds. They live almost exclusively in the Southern Hemisphere."},
        {"idx": 2, "question": "is water made of hydrogen and oxygen", "label": 1,
         "passage": "Water is an inorganic compound with the chemical formula H2O. Each molecule holds one oxygen and two hydrogen atoms."},
        {"idx": 3, "question": "does a spider have six legs", "label": 0,
         "passage": "Spiders are air-breathing arthropods that have eight legs and chelicerae with fangs."},
    ],
    "winogrande": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "Tom gave Ben a book because _ had finished reading it.",
         "option1": "Tom", "option2": "Ben", "answer": "1"},
        {"sentence": "The cat chased the mouse until _ was too tired to run.",
         "option1": "the cat", "option2": "the mouse", "answer": "2"},
    ],
    "hellaswag": [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val",
         "split_type": "indomain", "label": "3",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
        {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
         "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
         "source_id": "activitynet~v_-lJS58hyo1c", "split": "val", "split_type": "zeroshot", "label": "3",
         "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                     "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]},
        {"ind": 4183, "activity_label": "Food and Entertaining", "ctx_b": "",
         "ctx_a": "[header] How to make a simple cake [title] Preheat the oven. [step] Set it to 350 degrees.",
         "ctx": "[header] How to make a simple cake [title] Preheat the oven. [step] Set it to 350 degrees.",
         "source_id": "wikihow~6873", "split": "val", "split_type": "indomain", "label": "0",
         "endings": ["[title] Mix the flour and sugar. [step] Use a large bowl.", "[title] Eat the oven. [step] It is hot.",
                     "[title] Paint the cake blue.", "[title] Sing to the eggs. [step] Loudly."]},
        {"ind": 5, "activity_label": "Personal Care and Style", "ctx_b": "choose",
         "ctx_a": "[header] How to brush your hair [title] Pick a brush.",
         "ctx": "[header] How to brush your hair [title] Pick a brush. choose",
         "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0",
         "endings": [" a brush with soft bristles.", " a fork instead.", " to cut your hair off.", " nothing at all."]},
    ],
}  # fmt: skip
SHAPES = tuple(ROWS)
# lm-eval's own task for each shape (under lm_eval/tasks)
STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}


def docs_spec(name: str) -> str:
    """The spec file `name`.yaml as docs/tasks.md shows it (the ```yaml block starting "# name.yaml")."""
    text = (REPO / "docs" / "tasks.md").read_text(encoding="utf-8")
    match = re.search(rf"```yaml\n# {re.escape(name)}\.yaml\n(.*?)```", text, re.DOTALL)
    assert match, f"docs/tasks.md has no example {name}.yaml"
    return match.group(1)


def write_shapes(folder: Path) -> dict[str, Path]:
    """Each shape's rows and its docs/tasks.md spec in `folder`; returns the spec files."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = {}
    for name, rows in ROWS.items():
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
        )
        specs[name] = folder / f"{name}.yaml"
        specs[name].write_text(docs_spec(name), encoding="utf-8")
    return specs


def write_stock_tasks(folder: Path, data: Path, lm_eval_tasks: Path) -> dict[str, str]:
    """lm-eval's own task YAML of each shape, reading the rows in `data` zero-shot; returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for name in SHAPES:
        names[name] = f"stock_{name}"
        config = {
            "include": str(lm_eval_tasks / STOCK_YAML[name]),
            "task": names[name],
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,  # only the stock data file is swapped for ours
            "dataset_kwargs": {"data_files": {"test": str(data / f"{name}.jsonl")}},
            "training_split": None,
            "validation_split": None,
            "test_split": "test",
            "fewshot_split": None,
            "num_fewshot": 0,
        }
        (folder / f"stock_{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return names
