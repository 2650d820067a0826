"""The dynamic batcher alone: requests decoded together give what each gives alone, with `generate_text`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from tiny_models import tiny_model

from bitune import BituneConfig, BituneInputError, BituneModel, generate_text
from bitune.core.export import export_merged
from bitune.core.plain import PlainModel
from bitune.core.prompts import encode_prompts
from bitune.experiments.synthetic import build_tokenizer
from bitune.inference.batching import Batcher, SamplingParams, TextTail, _length_groups

PROMPTS = [
    "mary went to the garden . where is mary ?",
    "john has the ball . who has the ball ?",
    "where",
    "mary went to the garden . john went to the kitchen . daniel took the apple . where is the apple ?",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def model_for(tokenizer, family: str = "llama", mode: str = "bitune", folder: Path | None = None):
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    base = tiny_model(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, **ids)
    if mode == "plain":
        return PlainModel(base).eval()
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = BituneModel.from_base(
        base, config, BituneConfig(mode="bitune" if mode == "merged" else mode)
    ).eval()
    if model.mixer is not None:
        with torch.no_grad():  # trained-looking coefficients, so that both prompt passes matter
            model.mixer.keys.uniform_(-0.05, 0.05)
    if mode == "merged":  # `bitune export`'s folder: decoding runs the bare merged weights
        return BituneModel.from_pretrained(export_merged(model, folder / "export")).eval()
    return model


def run(batcher: Batcher, prompts: list[list[int]], params: SamplingParams, n: int = 1, gap: float = 0.0):
    """Submit every prompt (waiting `gap` seconds after the first half); the texts and finish reasons."""
    results: dict[tuple[int, int], list] = {}
    done = threading.Event()
    expected = len(prompts) * n

    def listener(index: int):
        def on_event(event) -> None:
            entry = results.setdefault((index, event.choice), ["", None, 0])
            entry[0] += event.text
            if event.finish_reason is not None:
                entry[1], entry[2] = event.finish_reason, event.tokens
                if sum(1 for e in results.values() if e[1] is not None) == expected:
                    done.set()

        return on_event

    for index, ids in enumerate(prompts):
        batcher.submit(ids, params, n, listener(index))
        if gap and index == len(prompts) // 2 - 1:
            time.sleep(gap)  # the second half joins a running batch
    assert done.wait(60)
    return [results[(i, c)] for i in range(len(prompts)) for c in range(n)]


@pytest.mark.parametrize(
    ("family", "mode"),
    [
        ("llama", "bitune"),
        ("mistral", "bitune"),
        ("gemma3", "no_mixing"),
        ("llama", "baseline"),
        ("llama", "merged"),
        ("qwen2", "plain"),
    ],
)
def test_batched_requests_give_what_generate_gives_each_alone(
    tokenizer, family: str, mode: str, tmp_path: Path
) -> None:
    """Sliding windows (mistral, gemma3), every kind of model `bitune serve` loads (a Bitune checkpoint, a PEFT
    adapter = mode baseline, a merged export, a base model), rows joining a running batch."""
    model = model_for(tokenizer, family, mode, tmp_path)
    prompts = PROMPTS * 3
    expected = [
        generate_text(model, tokenizer, [text], max_new_tokens=10, do_sample=False)[0] for text in PROMPTS
    ]
    batcher = Batcher(model, tokenizer, max_batch_size=8, wait_ms=20)
    try:
        got = run(
            batcher,
            encode_prompts(tokenizer, prompts),
            SamplingParams(max_tokens=10, temperature=0),
            gap=0.02,
        )
    finally:
        batcher.close()
    assert [text.strip() for text, _, _ in got] == [text.strip() for text in expected * 3]
    assert batcher.stats.max_rows > 1  # they were decoded together
    assert max(batcher.stats.row_counts) <= 8


def test_sampling_is_seeded_per_choice_and_independent_of_the_batch(tokenizer) -> None:
    model = model_for(tokenizer)
    ids = encode_prompts(tokenizer, PROMPTS[:2])
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    batcher = Batcher(model, tokenizer, max_batch_size=8, wait_ms=20)
    try:
        together = run(batcher, ids, params, n=3)
        alone = [run(batcher, [prompt], params, n=3) for prompt in ids]
        unseeded = run(batcher, ids[:1], SamplingParams(max_tokens=8, temperature=1.0), n=4)
    finally:
        batcher.close()
    assert together == [entry for row in alone for entry in row]
    assert len({text for text, _, _ in together[:3]}) > 1  # each choice has its own seed
    assert len({text for text, _, _ in unseeded}) > 1


def test_limits_and_bad_submissions(tokenizer) -> None:
    model = model_for(tokenizer)
    batcher = Batcher(model, tokenizer, max_batch_size=4, wait_ms=0)
    try:
        ids = encode_prompts(tokenizer, PROMPTS[:1])
        ((text, reason, tokens),) = run(batcher, ids, SamplingParams(max_tokens=3, temperature=0))
        assert (reason, tokens) == ("length", 3)
        # Near the end of the model's 128 positions, the answer is cut there.
        long = [tokenizer.bos_token_id] + ids[0][1:] * 20
        ((_, reason, tokens),) = run(batcher, [long[:125]], SamplingParams(max_tokens=50, temperature=0))
        assert reason == "length" and tokens <= 3
        for prompt, n, message in (([], 1, "empty"), (long[:128], 1, "128 positions"), (ids[0], 5, "n must")):
            with pytest.raises(BituneInputError, match=message):
                batcher.submit(prompt, SamplingParams(max_tokens=4), n, lambda event: None)
        # A one-token prompt has nothing to prefill: decoding starts from it, with θ_c, as a causal model would.
        bos = tokenizer.bos_token_id
        ((text, _, _),) = run(batcher, [[bos]], SamplingParams(max_tokens=6, temperature=0))
        with torch.no_grad(), model._adapter("causal"):
            output = model.base_model.generate(torch.tensor([[bos]]), max_new_tokens=6, do_sample=False)
        assert text == tokenizer.decode(output[0, 1:], skip_special_tokens=True)
    finally:
        batcher.close()


def test_text_is_held_back_while_it_may_become_a_stop_string(tokenizer) -> None:
    ids = tokenizer("mary went to the garden .", add_special_tokens=False)["input_ids"]
    tail = TextTail(tokenizer, ("the garden", "xyz"))
    pieces = [tail.push(token) for token in ids]
    assert "".join(piece for piece, _ in pieces) == "mary went to "
    assert [stopped for _, stopped in pieces][:5] == [False, False, False, False, True]  # at "garden"
    plain = TextTail(tokenizer)
    assert "".join(plain.push(token)[0] for token in ids) + plain.flush() == "mary went to the garden ."


def test_prompts_are_prefilled_in_groups_of_similar_length() -> None:
    class Ticket:
        def __init__(self, length: int) -> None:
            self.prompt_ids = [1] * length

    groups = _length_groups([Ticket(n) for n in (40, 1, 9, 10, 11, 1, 300)])
    assert [[len(t.prompt_ids) for t in group] for group in groups] == [[1, 1], [9, 10, 11], [40], [300]]
