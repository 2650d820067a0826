import random
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from bitune.errors import BituneInputError
from bitune.experiments.synthetic import (
    BOS,
    COUNT_WORDS,
    NAMES,
    QUESTION_MARKER,
    TASK_TYPES,
    StorySettings,
    build_tokenizer,
    exact_match,
    make_pretraining_corpus,
    make_pretraining_story,
    make_qa_dataset,
    pretrain_config,
    vocabulary,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return make_qa_dataset(TASK_TYPES, n_train=300, n_test=100, seed=7)


class Replay:
    """An independent re-reading of a story's text: where everyone is and who holds what, sentence by sentence."""

    statement_to_question = {
        r"(\w+) is in the (\w+)": "where is {} ?",
        r"the (\w+) is with (\w+)": "who has the {} ?",
        r"the (\w+) is in the (\w+)": "where is the {} ?",
        r"(\w+) is carrying the (\w+)": "what is {} carrying ?",
        r"(\w+) has (\w+) objects": "how many objects does {} have ?",
    }

    def __init__(self) -> None:
        self.location: dict[str, str] = {}
        self.holder: dict[str, str] = {}

    def read_event(self, sentence: str) -> bool:
        """Apply `sentence` if it is an event; False if it is not one."""
        if match := re.fullmatch(r"(\w+) (?:went|moved|travelled) to the (\w+)", sentence):
            self.location[match[1]] = match[2]
        elif match := re.fullmatch(r"(\w+) (?:took|grabbed|picked up) the (\w+)", sentence):
            assert match[2] not in self.holder, f"{match[2]} taken twice"
            self.holder[match[2]] = match[1]
        elif match := re.fullmatch(r"(\w+) got the (\w+) from (\w+)", sentence):
            assert self.holder[match[2]] == match[3], f"{match[3]} gave away what they did not have"
            self.holder[match[2]] = match[1]
        else:
            return False
        return True

    def carried(self, person: str) -> list[str]:
        return [obj for obj, who in self.holder.items() if who == person]

    def answer(self, question: str) -> str:
        if match := re.fullmatch(r"where is the (\w+) \?", question):
            return self.location[self.holder[match[1]]]
        if match := re.fullmatch(r"where is (\w+) \?", question):
            return self.location[match[1]]
        if match := re.fullmatch(r"who has the (\w+) \?", question):
            return self.holder[match[1]]
        if match := re.fullmatch(r"what is (\w+) carrying \?", question):
            (obj,) = self.carried(match[1])
            return obj
        if match := re.fullmatch(r"how many objects does (\w+) have \?", question):
            return COUNT_WORDS[len(self.carried(match[1]))]
        raise AssertionError(f"unexpected question {question!r}")

    def check_statement(self, sentence: str) -> None:
        for pattern, question in self.statement_to_question.items():
            if match := re.fullmatch(pattern, sentence):
                assert match[2] == self.answer(question.format(match[1])), sentence
                return
        raise AssertionError(f"unexpected sentence {sentence!r}")

    def true_statements(self) -> set[str]:
        facts = {f"{p} is in the {place}" for p, place in self.location.items()}
        facts |= {f"the {obj} is with {who}" for obj, who in self.holder.items()}
        facts |= {f"the {obj} is in the {self.location[who]}" for obj, who in self.holder.items()}
        facts |= {
            f"{p} is carrying the {self.carried(p)[0]}" for p in self.location if len(self.carried(p)) == 1
        }
        facts |= {f"{p} has {COUNT_WORDS[len(self.carried(p))]} objects" for p in self.location}
        return facts


def sentences(text: str) -> list[str]:
    assert text.endswith(" .")
    return text.removesuffix(" .").split(" . ")


def expected_answer(prompt: str) -> str:
    story, question = prompt.split(f" {QUESTION_MARKER} ")
    replay = Replay()
    for sentence in sentences(story):
        assert replay.read_event(sentence), f"not an event: {sentence!r}"
    return replay.answer(question)


def test_answers_follow_from_the_story(dataset):
    for row in dataset["train"] + dataset["test"]:
        assert row["completion"] == expected_answer(row["prompt"]), row


def test_every_pretraining_statement_is_true_where_it_stands_and_all_facts_close_the_story():
    rng = random.Random(3)
    for _ in range(200):
        text, said = make_pretraining_story(rng)
        replay = Replay()
        stated = []
        for sentence in sentences(text):
            if not replay.read_event(sentence):
                replay.check_statement(sentence)
                stated.append(sentence)
        assert stated == [statement.removesuffix(" .") for _, statement, _ in said]
        assert all(answer in statement.split() for _, statement, answer in said)
        closing = stated[len(stated) - len(replay.true_statements()) :]
        assert set(closing) == replay.true_statements()


def kinds_of_sentences(text: str) -> list[str]:
    replay = Replay()
    return ["event" if replay.read_event(sentence) else "statement" for sentence in sentences(text)]


def test_story_settings_shape_the_pretraining_corpus():
    bare = StorySettings(stated_changes=0.0, spot_checks=0.0, closing_statements=2)
    for text in make_pretraining_corpus(50, seed=0, settings=bare):
        kinds = kinds_of_sentences(text)
        assert kinds == ["event"] * (len(kinds) - 2) + ["statement"] * 2
    rich = StorySettings(stated_changes=1.0, spot_checks=1.0, closing_statements=0)
    for text in make_pretraining_corpus(50, seed=0, settings=rich):
        kinds = kinds_of_sentences(text)
        assert kinds[:3] == [
            "event",
            "statement",
            "statement",
        ]  # the first move's new fact, then a spot check
        assert kinds.count("statement") == 2 * kinds.count("event")


def test_story_settings_shape_the_stories():
    settings = StorySettings(people=2, objects=3, events=(6, 6))
    for row in make_qa_dataset(TASK_TYPES, n_train=50, n_test=0, seed=0, settings=settings)["train"]:
        story = row["prompt"].split(f" {QUESTION_MARKER} ")[0]
        assert len(sentences(story)) == 2 + 6
        assert len({word for word in story.split() if word in NAMES}) <= 2


def test_the_question_ends_the_prompt_and_no_answer_cue_is_in_it(dataset):
    for row in dataset["train"]:
        story, question = row["prompt"].split(f" {QUESTION_MARKER} ")
        assert question.endswith(" ?") and question.count("?") == 1
        assert "answer" not in row["prompt"].lower()
        assert story.endswith(" .")


def test_every_task_type_is_in_both_splits_in_equal_shares(dataset):
    for split, size in (("train", 300), ("test", 100)):
        counts = {task: sum(row["task"] == task for row in dataset[split]) for task in TASK_TYPES}
        assert set(counts.values()) == {size // len(TASK_TYPES)}, (split, counts)


def test_splits_are_disjoint_and_prompts_unique(dataset):
    prompts = [row["prompt"] for row in dataset["train"] + dataset["test"]]
    assert len(set(prompts)) == len(prompts)


def test_same_seed_same_data_other_seed_other_data():
    first = make_qa_dataset(["person_location", "object_count"], n_train=20, n_test=10, seed=1)
    assert first == make_qa_dataset(["person_location", "object_count"], n_train=20, n_test=10, seed=1)
    assert first != make_qa_dataset(["person_location", "object_count"], n_train=20, n_test=10, seed=2)
    assert make_pretraining_corpus(5, seed=1) == make_pretraining_corpus(5, seed=1)
    assert make_pretraining_corpus(5, seed=1) != make_pretraining_corpus(5, seed=2)


def test_test_split_does_not_depend_on_the_size_of_the_train_split():
    small = make_qa_dataset(TASK_TYPES, n_train=5, n_test=10, seed=0)
    large = make_qa_dataset(TASK_TYPES, n_train=50, n_test=10, seed=0)
    assert small["test"] == large["test"]


def test_answers_are_single_known_words(dataset, tokenizer):
    for row in dataset["train"] + dataset["test"]:
        ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, row["completion"]


def test_every_generated_text_tokenizes_without_unknown_words(dataset, tokenizer):
    texts = [f"Question: {row['prompt']}\n\nAnswer: {row['completion']}" for row in dataset["train"]]
    texts += make_pretraining_corpus(200, seed=0)
    for ids in tokenizer(texts)["input_ids"]:
        assert tokenizer.unk_token_id not in ids


def test_unknown_words_become_unk(tokenizer):
    ids = tokenizer("mary went to paris", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.unk_token_id
    assert tokenizer.unk_token_id not in ids[:-1]


def test_tokenizer_prepends_one_bos_and_round_trips(tokenizer):
    text = make_pretraining_corpus(1, seed=0)[0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert len(ids) == len(text.split()) + 1  # one token per word
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == f"{BOS} {text}"
    assert (
        tokenizer.decode(tokenizer("Mary went to the Garden.")["input_ids"][1:])
        == "mary went to the garden ."
    )


def test_tokenizer_special_tokens_and_padding(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 3)
    assert tokenizer("the ball </s>")["input_ids"][-1] == tokenizer.eos_token_id
    batch = tokenizer(["mary", "mary went home"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[-2:] == [0, 0] and batch["attention_mask"][0].sum() == 2


def test_tokenizer_survives_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Question: where is mary ?\n\nAnswer:"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()


def test_vocabulary_is_fixed_whatever_the_random_or_hash_state():
    words = vocabulary()
    # sorted after the special tokens, so no set or hash order can leak in
    assert words == ["<pad>", "<unk>", "<s>", "</s>", *sorted(set(words[4:]))]
    random.seed(99)
    assert build_tokenizer().get_vocab() == {word: i for i, word in enumerate(words)}


def test_pretrain_config_fits_the_tokenizer(tokenizer):
    config = pretrain_config(len(tokenizer))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(pretrain_config(len(tokenizer), num_hidden_layers=1))
    batch = tokenizer(make_pretraining_corpus(2, seed=0), padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (*batch["input_ids"].shape, len(tokenizer))


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("garden", "garden", True),
        (" Garden.</s>", "garden", True),
        ("garden </s> kitchen", "garden", True),
        ("kitchen garden", "garden", False),
        ("", "garden", False),
        ("gardens", "garden", False),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_bad_input_is_rejected_with_a_clear_message():
    with pytest.raises(BituneInputError, match="unknown task type 'where'.*person_location"):
        make_qa_dataset(["where"], n_train=1, n_test=1, seed=0)
    with pytest.raises(BituneInputError, match="task_types is empty"):
        make_qa_dataset([], n_train=1, n_test=1, seed=0)
    with pytest.raises(BituneInputError, match="n_test = -1"):
        make_qa_dataset(TASK_TYPES, n_train=1, n_test=-1, seed=0)
    with pytest.raises(BituneInputError, match="n_stories = -2"):
        make_pretraining_corpus(-2, seed=0)
    with pytest.raises(BituneInputError, match="non-empty answer"):
        exact_match("garden", " . ")
    with pytest.raises(BituneInputError, match="StorySettings.objects = 4; use 1 to 3"):
        StorySettings(objects=4)
    with pytest.raises(BituneInputError, match="StorySettings.events"):
        StorySettings(events=(3, 2))
    with pytest.raises(BituneInputError, match="StorySettings.spot_checks = 1.5"):
        StorySettings(spot_checks=1.5)
