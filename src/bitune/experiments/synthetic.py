"""Synthetic bAbI-style stories for the self-contained demo and CPU-scale reproductions.

A story is a handful of simple sentences about people moving between places and handing objects to each
other, with fresh entities drawn for every story from small fixed word lists:

    mary went to the garden . john took the ball . mary got the ball from john . john moved to the cellar .

Two products come out of the same stories:

* instruction data (`make_qa_dataset`): the story, then a question at the very end of the prompt
  ("question : where is the ball ?") and a one-word answer ("garden"). As the question comes last, a
  causal reader meets every fact before it knows which ones matter; a bidirectional reading of the prompt
  lets the facts see the question.
* a pretraining corpus (`make_pretraining_corpus`): the same kind of stories, with statements of the facts
  the questions ask about ("the ball is in the garden .") inside and after them, so that a tiny base model
  learns to look facts up in its context before it is ever instruction-tuned (docs: small_scale.md).

Everything is lowercase words and punctuation separated by spaces, so the closed word-level vocabulary of
`build_tokenizer` covers every generated text exactly.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

from bitune.errors import BituneInputError

NAMES = ("mary", "john", "sandra", "daniel", "emma", "oliver", "lucy", "peter")
PLACES = ("kitchen", "garden", "office", "hallway", "bedroom", "bathroom", "cellar", "garage")
OBJECTS = ("apple", "ball", "book", "key", "cup", "hat", "lamp", "coin")
COUNT_WORDS = ("zero", "one", "two", "three")

MOVE_VERBS = ("went", "moved", "travelled")
TAKE_VERBS = ("took", "grabbed", "picked up")

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # in this order, so their ids are 0, 1, 2, 3

# The prompt text ends with "question : ..."; "answer" is there for the plain instruction template
# "Question: {prompt}\n\nAnswer:", which the lowercasing tokenizer reads as words of this vocabulary.
QUESTION_MARKER = "question :"
_TEMPLATE_WORDS = ("question", "answer", ":")


@dataclass(frozen=True)
class StorySettings:
    """How big the stories are and how densely the pretraining corpus states their facts.

    Args:
        people: people per story; each moves once at the start, so everyone has a location.
        objects: objects per story that can be taken (at most 3, the largest count word).
        events: inclusive range of random moves, takes and hand-overs after the first moves.
        stated_changes: pretraining only; after each sentence, the chance that a fact it just changed is
            stated ("mary went to the cellar . mary is in the cellar ."): short-range copies from which the
            look-up skill grows quickly.
        spot_checks: pretraining only; after each sentence, the chance that some current fact is stated.
        closing_statements: pretraining only; how many facts, in random order, close a story (None: all).

    Example:
        >>> StorySettings(people=2).events
        (4, 7)
    """

    people: int = 3
    objects: int = 2
    events: tuple[int, int] = (4, 7)
    stated_changes: float = 0.6
    spot_checks: float = 0.3
    closing_statements: int | None = None

    def __post_init__(self) -> None:
        limits = {"people": (1, len(NAMES)), "objects": (1, len(COUNT_WORDS) - 1)}
        for name, (low, high) in limits.items():
            if not low <= getattr(self, name) <= high:
                raise BituneInputError(f"StorySettings.{name} = {getattr(self, name)}; use {low} to {high}")
        if not 0 <= self.events[0] <= self.events[1]:
            raise BituneInputError(
                f"StorySettings.events = {self.events}; use (low, high) with 0 <= low <= high"
            )
        for name in ("stated_changes", "spot_checks"):
            if not 0 <= getattr(self, name) <= 1:
                raise BituneInputError(
                    f"StorySettings.{name} = {getattr(self, name)}; use a probability in [0, 1]"
                )
        if self.closing_statements is not None and self.closing_statements < 0:
            raise BituneInputError(
                f"StorySettings.closing_statements = {self.closing_statements}; use >= 0 or None"
            )


DEFAULT_SETTINGS = StorySettings()


@dataclass
class World:
    """A story as the list of its sentences plus the state they leave behind."""

    people: tuple[str, ...]
    sentences: list[str] = field(default_factory=list)
    location: dict[str, str] = field(default_factory=dict)  # person -> place of their last move
    holder: dict[str, str] = field(default_factory=dict)  # object -> who got it last

    def carried(self, person: str) -> list[str]:
        return [obj for obj, holder in self.holder.items() if holder == person]


@dataclass(frozen=True)
class QuestionType:
    """One kind of question: how to ask it, how to state its answer, and which (subject, answer) a world has."""

    question: str  # "{subject}" is filled in
    statement: str  # "{subject}" and "{answer}" are filled in; the subject comes first
    facts: Callable[[World], list[tuple[str, str]]]


TASKS: dict[str, QuestionType] = {
    # the last place of a person who may have moved several times
    "person_location": QuestionType(
        question="where is {subject} ?",
        statement="{subject} is in the {answer} .",
        facts=lambda world: sorted(world.location.items()),
    ),
    # an object passed between people: who got it last
    "object_holder": QuestionType(
        question="who has the {subject} ?",
        statement="the {subject} is with {answer} .",
        facts=lambda world: sorted(world.holder.items()),
    ),
    # two hops: who holds the object, then where that person is now
    "object_location": QuestionType(
        question="where is the {subject} ?",
        statement="the {subject} is in the {answer} .",
        facts=lambda world: sorted((obj, world.location[who]) for obj, who in world.holder.items()),
    ),
    # the reverse look-up: the one object a person ends up with
    "carried_object": QuestionType(
        question="what is {subject} carrying ?",
        statement="{subject} is carrying the {answer} .",
        facts=lambda world: [(p, world.carried(p)[0]) for p in world.people if len(world.carried(p)) == 1],
    ),
    # every take and hand-over of the story matters: count what a person ends up with
    "object_count": QuestionType(
        question="how many objects does {subject} have ?",
        statement="{subject} has {answer} objects .",
        facts=lambda world: [(p, COUNT_WORDS[len(world.carried(p))]) for p in world.people],
    ),
}
TASK_TYPES = tuple(TASKS)

Statement = tuple[str, str, str]  # (task type, text, answer word)


def play_world(rng: random.Random, settings: StorySettings = DEFAULT_SETTINGS) -> Iterator[World]:
    """Draw entities and a random sequence of moves, takes and hand-overs; yield the world after each sentence.

    The same `World` object grows with every step; everyone moves first, then the random events follow.

    Example:
        >>> [len(world.sentences) for world in play_world(random.Random(0), StorySettings(events=(2, 2)))]
        [1, 2, 3, 4, 5]
    """
    world = World(people=tuple(rng.sample(NAMES, settings.people)))
    objects = rng.sample(OBJECTS, settings.objects)

    def move(person: str) -> None:
        place = rng.choice([p for p in PLACES if p != world.location.get(person)])
        world.location[person] = place
        world.sentences.append(f"{person} {rng.choice(MOVE_VERBS)} to the {place} .")

    for person in rng.sample(world.people, len(world.people)):
        move(person)
        yield world
    for _ in range(rng.randint(*settings.events)):
        free = [obj for obj in objects if obj not in world.holder]
        kinds = (
            ["move"] + ["take"] * bool(free) + ["hand_over"] * bool(world.holder and len(world.people) > 1)
        )
        kind = rng.choice(kinds)
        if kind == "move":
            move(rng.choice(world.people))
        elif kind == "take":
            obj, person = rng.choice(free), rng.choice(world.people)
            world.holder[obj] = person
            world.sentences.append(f"{person} {rng.choice(TAKE_VERBS)} the {obj} .")
        else:
            obj = rng.choice(sorted(world.holder))
            giver = world.holder[obj]
            receiver = rng.choice([p for p in world.people if p != giver])
            world.holder[obj] = receiver
            world.sentences.append(f"{receiver} got the {obj} from {giver} .")
        yield world


def simulate_world(rng: random.Random, settings: StorySettings = DEFAULT_SETTINGS) -> World:
    """A whole story and the state it leaves behind.

    Example:
        >>> world = simulate_world(random.Random(0))
        >>> set(world.location) == set(world.people)
        True
    """
    *_, world = play_world(rng, settings)  # every step yields the same, finally complete, world
    return world


def statements(world: World) -> list[Statement]:
    """Every fact the tasks can ask about in `world`, as `(task_type, statement, answer)`.

    Example:
        >>> world = World(people=("mary",), location={"mary": "garden"})
        >>> statements(world)
        [('person_location', 'mary is in the garden .', 'garden'), ('object_count', 'mary has zero objects .', 'zero')]
    """
    return [
        (task_type, kind.statement.format(subject=subject, answer=answer), answer)
        for task_type, kind in TASKS.items()
        for subject, answer in kind.facts(world)
    ]


def vocabulary() -> list[str]:
    """Every word the generators can write, special tokens first (ids 0-3); the same list on every call.

    Example:
        >>> vocabulary()[:4]
        ['<pad>', '<unk>', '<s>', '</s>']
    """
    templates = [f"{verb} to the ." for verb in MOVE_VERBS] + [f"{verb} the got from" for verb in TAKE_VERBS]
    templates += [kind.question + " " + kind.statement for kind in TASKS.values()]
    words = {word for text in templates for word in text.split() if not word.startswith("{")}
    words.update(NAMES + PLACES + OBJECTS + COUNT_WORDS + _TEMPLATE_WORDS)
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary()`: lowercases, splits on spaces and punctuation, prepends <s>.

    Example:
        >>> tokenizer = build_tokenizer()
        >>> tokenizer.convert_ids_to_tokens(tokenizer("Mary went to the garden.")["input_ids"])
        ['<s>', 'mary', 'went', 'to', 'the', 'garden', '.']
        >>> tokenizer.decode(tokenizer("mary went to the garden .")["input_ids"], skip_special_tokens=True)
        'mary went to the garden .'
    """
    words = vocabulary()
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, words.index(BOS))]
    )
    # add_bos_token=True makes transformers' own attribute agree with the post-processor (and survive saving).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=512,
    )


def pretrain_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A tiny Llama for the CPU demo (4 layers, hidden 128, 4 heads, 2 KV heads); `overrides` go to LlamaConfig.

    Example:
        >>> pretrain_config(len(vocabulary())).num_hidden_layers
        4
    """
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        # Larger than Llama's 0.02: tiny models trained for minutes leave their initial plateau much sooner.
        "initializer_range": 0.06,
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
    }
    return LlamaConfig(**(settings | overrides))


def make_qa_sample(
    task_type: str, rng: random.Random, settings: StorySettings = DEFAULT_SETTINGS
) -> dict[str, str]:
    """One prompt/completion row: a fresh story, then the question of `task_type` at the end of the prompt.

    Example:
        >>> row = make_qa_sample("person_location", random.Random(0))
        >>> row["prompt"].endswith("?"), row["task"]
        (True, 'person_location')
    """
    question_type = _question_type(task_type)
    while True:
        world = simulate_world(rng, settings)
        facts = question_type.facts(world)
        if facts:  # e.g. nobody may end up carrying exactly one object; then draw another story
            break
    subject, answer = rng.choice(facts)
    prompt = " ".join([*world.sentences, QUESTION_MARKER, question_type.question.format(subject=subject)])
    return {"prompt": prompt, "completion": answer, "task": task_type}


def make_qa_dataset(
    task_types: Sequence[str],
    n_train: int,
    n_test: int,
    seed: int,
    settings: StorySettings = DEFAULT_SETTINGS,
) -> dict[str, list[dict[str, str]]]:
    """Train and held-out test rows, cycling through `task_types`; no prompt occurs twice across both splits.

    Rows are `{"prompt", "completion", "task"}`; the prompt holds no "Answer:", which the instruction
    template adds. The test split does not depend on `n_train`.

    Example:
        >>> data = make_qa_dataset(["person_location", "object_holder"], n_train=4, n_test=2, seed=0)
        >>> [len(data["train"]), len(data["test"])], data["test"][1]["task"]
        ([4, 2], 'object_holder')
    """
    if not task_types:
        raise BituneInputError(f"task_types is empty; choose some of {', '.join(TASK_TYPES)}")
    for task_type in task_types:
        _question_type(task_type)
    for name, count in (("n_train", n_train), ("n_test", n_test)):
        if count < 0:
            raise BituneInputError(f"{name} = {count}; give a number of rows >= 0")
    rng = random.Random(seed)
    seen: set[str] = set()

    def split(count: int) -> list[dict[str, str]]:
        rows = []
        for i in range(count):
            task_type = task_types[i % len(task_types)]
            for _ in range(1000):
                row = make_qa_sample(task_type, rng, settings)
                if row["prompt"] not in seen:
                    break
            else:
                raise BituneInputError(
                    f"could not draw {count} distinct {task_type!r} prompts; ask for fewer rows"
                )
            seen.add(row["prompt"])
            rows.append(row)
        return rows

    test = split(n_test)  # drawn first, so a test set stays the same whatever n_train is
    return {"train": split(n_train), "test": test}


def make_pretraining_story(
    rng: random.Random, settings: StorySettings = DEFAULT_SETTINGS
) -> tuple[str, list[Statement]]:
    """A story with statements of its facts: some right after the events, then closing ones in random order.

    Returns the text and its statements as `(task_type, statement, answer)`, in the order they appear.
    Each statement names its subject before its answer, so predicting the answer word needs a look-up.

    Example:
        >>> text, said = make_pretraining_story(random.Random(0))
        >>> text.endswith(said[-1][1])
        True
    """
    parts: list[str] = []
    said: list[Statement] = []
    before: list[Statement] = []
    for world in play_world(rng, settings):
        parts.append(world.sentences[-1])
        now = statements(world)
        changed = [statement for statement in now if statement not in before]
        before = now
        if changed and rng.random() < settings.stated_changes:
            said.append(rng.choice(changed))
            parts.append(said[-1][1])
        if rng.random() < settings.spot_checks:
            said.append(rng.choice(now))
            parts.append(said[-1][1])
    closing = statements(world)
    rng.shuffle(closing)
    closing = closing[: settings.closing_statements]
    said += closing
    parts += [text for _, text, _ in closing]
    return " ".join(parts), said


def make_pretraining_corpus(
    n_stories: int, seed: int, settings: StorySettings = DEFAULT_SETTINGS
) -> list[str]:
    """Plain-text stories for pretraining the tiny base model: facts stated in context, no questions.

    Example:
        >>> corpus = make_pretraining_corpus(2, seed=0)
        >>> len(corpus), corpus == make_pretraining_corpus(2, seed=0)
        (2, True)
    """
    if n_stories < 0:
        raise BituneInputError(f"n_stories = {n_stories}; give a number of stories >= 0")
    rng = random.Random(seed)
    return [make_pretraining_story(rng, settings)[0] for _ in range(n_stories)]


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the first word of `prediction` is `answer`, ignoring case, special tokens and punctuation.

    Example:
        >>> exact_match(" Garden.</s>", "garden"), exact_match("kitchen garden", "garden")
        (True, False)
    """
    expected = _first_word(answer)
    if not expected:
        raise BituneInputError(f"answer {answer!r} has no word to compare against; give a non-empty answer")
    return _first_word(prediction) == expected


def _first_word(text: str) -> str:
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    words = text.lower().split()
    return words[0].strip(string.punctuation) if words else ""


def _question_type(task_type: str) -> QuestionType:
    if task_type not in TASKS:
        raise BituneInputError(f"unknown task type {task_type!r}; choose from {', '.join(TASK_TYPES)}")
    return TASKS[task_type]
