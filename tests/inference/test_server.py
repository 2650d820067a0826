"""`bitune serve`'s HTTP API, through the official `openai` client and raw HTTP, on servers started here.

Every server listens on a free port of 127.0.0.1 only and stops at the end of its test module.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from peft import LoraConfig
from tiny_models import tiny_model

from bitune import BituneModel, generate_text
from bitune.core.prompts import render_prompt
from bitune.experiments.synthetic import build_tokenizer
from bitune.inference.batching import Batcher

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from bitune.inference.server import ServerSettings, _render_chat, create_app, running_server  # noqa: E402

MODEL = "tiny-bitune"
WORDS = ["mary", "john", "daniel", "sandra", "went", "to", "the", "garden", "kitchen", "hallway", "bedroom"]
QUESTIONS = [
    f"{WORDS[i % 4]} {WORDS[4]} {WORDS[5]} the {WORDS[7 + i % 4]} . where is {WORDS[i % 4]} ?"
    for i in range(16)
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_bitune(tokenizer, **overrides) -> BituneModel:
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    base = tiny_model(
        "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, **ids, **overrides
    )
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = BituneModel.from_base(base, config).eval()
    with torch.no_grad():
        model.mixer.keys.uniform_(-0.05, 0.05)
    return model


@pytest.fixture(scope="module")
def model(tokenizer) -> BituneModel:
    return tiny_bitune(tokenizer)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    """(base URL, batcher) of a server for the tiny model with the plain template."""
    batcher = Batcher(model, tokenizer, max_batch_size=16, wait_ms=20)
    try:
        with running_server(create_app(batcher, ServerSettings(MODEL, default_max_tokens=12))) as url:
            yield url, batcher
    finally:
        batcher.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one raw HTTP request."""
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def greedy_alone(model, tokenizer, text: str, max_tokens: int = 12) -> str:
    return generate_text(
        model,
        tokenizer,
        [text],
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
    )[0]


def chat(client, question: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, **kwargs
    )


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "bitune"
    assert request(server[0], "GET", "/health") == (200, {"status": "ok"})


def test_chat_completion_is_the_models_greedy_answer_with_usage(model, tokenizer, client) -> None:
    response = chat(client, QUESTIONS[0], max_tokens=12)
    (choice,) = response.choices
    text = render_prompt(QUESTIONS[0], "plain")
    assert choice.message.role == "assistant"
    assert choice.message.content.strip() == greedy_alone(model, tokenizer, text).strip()
    prompt_tokens = len(tokenizer(text)["input_ids"])
    completion_tokens = len(tokenizer(choice.message.content, add_special_tokens=False)["input_ids"])
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens >= completion_tokens
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    assert response.model == MODEL and response.id.startswith("chatcmpl-")


def test_completions_take_several_prompts_and_n_choices(model, tokenizer, client) -> None:
    prompts = ["mary went to the", "john took the ball . where is the ball ?"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for index, prompt in enumerate(prompts):
        expected = greedy_alone(model, tokenizer, prompt, 6).strip()
        assert [c.text.strip() for c in response.choices[2 * index : 2 * index + 2]] == [expected, expected]
    assert response.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    tokens = client.completions.create(
        model=MODEL, prompt=tokenizer(prompts[0])["input_ids"], max_tokens=6, temperature=0
    )
    assert tokens.choices[0].text == response.choices[0].text


def test_streaming_gives_the_same_text_as_a_whole_response(client) -> None:
    whole = chat(client, QUESTIONS[1], max_tokens=10)
    chunks = list(
        chat(client, QUESTIONS[1], max_tokens=10, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    arguments = dict(model=MODEL, prompt="mary went to the", max_tokens=8, temperature=0)
    text = client.completions.create(**arguments).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(**arguments, stream=True)) == text


def test_stop_strings_and_max_tokens_end_a_choice(client) -> None:
    free = chat(client, QUESTIONS[2], max_tokens=12).choices[0]
    words = free.message.content.split()
    assert len(words) >= 3, free
    cut = chat(client, QUESTIONS[2], max_tokens=12, stop=[words[2], "never appears"]).choices[0]
    assert cut.finish_reason == "stop" and words[2] not in cut.message.content
    assert free.message.content.startswith(cut.message.content)
    short = chat(client, QUESTIONS[2], max_tokens=2).choices[0]
    assert short.finish_reason == "length" and short.message.content.split() == words[:2]


def test_seeded_sampling_is_reproducible(client) -> None:
    def sample(seed: int | None) -> list[str]:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTIONS[3]}],
            max_tokens=10,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            n=3,
        )
        return [c.message.content for c in response.choices]

    first = sample(11)
    assert sample(11) == first
    assert len(set(first)) > 1 or sample(12) != first


def test_sixteen_concurrent_requests_give_the_sixteen_sequential_answers(
    server, client, model, tokenizer
) -> None:
    batcher = server[1]
    sequential = [chat(client, q, max_tokens=12).choices[0].message.content for q in QUESTIONS]
    assert max(list(batcher.stats.row_counts)[-12:]) == 1  # one at a time: one row per step
    # The same model behind a server with a window long enough that all 16 arrive in it, however busy the
    # machine: then they are prefilled and decoded together for sure.
    together = Batcher(model, tokenizer, max_batch_size=16, wait_ms=500)
    barrier = threading.Barrier(len(QUESTIONS))
    try:
        with running_server(create_app(together, ServerSettings(MODEL))) as url:
            concurrent_client = openai.OpenAI(
                base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60
            )

            def ask(question: str) -> str:
                barrier.wait()
                return chat(concurrent_client, question, max_tokens=12).choices[0].message.content

            with ThreadPoolExecutor(len(QUESTIONS)) as pool:
                concurrent = list(pool.map(ask, QUESTIONS))
    finally:
        together.close()
    assert concurrent == sequential
    assert together.stats.max_rows == len(QUESTIONS)  # decoded as one batch
    assert together.stats.prefills <= 2  # prefilled together (in groups of similar length)


BAD_REQUESTS = [
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny-bitune", "messages": [', 400, None),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", 400, None),
    ("unknown model", "POST", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("no messages", "POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("no model", "POST", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("max_tokens 0", "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -3", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens text", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature text", "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("messages not a list", "POST", "/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("message without role", "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages"),
    ("stream not a bool", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("n zero", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("n above the batch", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ("top_p above 1", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("five stop strings", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": list("abcde")}, 400, "stop"),
    ("prompt too long", "POST", "/v1/completions", {"model": MODEL, "prompt": "mary " * 200}, 400, "prompt"),
    ("chat too long", "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "mary " * 200}]}, 400, "messages"),
    ("empty prompt", "POST", "/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("token out of range", "POST", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ("assistant last, plain", "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("logprobs", "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ("unknown path", "GET", "/v1/engines", None, 404, None),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_a_bad_request_gets_an_openai_style_error(server, method, path, body, status, param) -> None:
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    got, answer = request(server[0], method, path, data)
    assert got == status, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if status == 404 and param == "model":
        assert error["code"] == "model_not_found"
    if "mary " * 200 in json.dumps(body if isinstance(body, dict) else None):
        assert error["code"] == "context_length_exceeded"


def test_the_server_survives_every_bad_request(server, client) -> None:
    for _, method, path, body, _, _ in BAD_REQUESTS:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        assert 400 <= request(server[0], method, path, data)[0] < 500
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert chat(client, QUESTIONS[0], max_tokens=4).choices[0].message.content
    assert server[1].load == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_place(tokenizer, stream: bool) -> None:
    model = tiny_bitune(tokenizer, max_position_embeddings=4096)
    batcher = Batcher(model, tokenizer, max_batch_size=4, wait_ms=0)
    batcher.eos_token_ids = set()  # the answer would run to max_tokens
    body = {
        "model": MODEL,
        "prompt": "mary went to the",
        "max_tokens": 4000,
        "temperature": 0,
        "stream": stream,
    }
    try:
        with running_server(create_app(batcher, ServerSettings(MODEL))) as url:
            address = urlparse(url)
            with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
                data = json.dumps(body).encode()
                head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                connection.sendall(head.encode() + data)
                if stream:
                    received = b""
                    while b"data: " not in received:  # the headers, then the first event
                        received += connection.recv(4096)
                else:
                    deadline = time.monotonic() + 10
                    while batcher.stats.steps < 5 and time.monotonic() < deadline:
                        time.sleep(0.01)
                assert batcher.load == 1
            deadline = time.monotonic() + 10
            while batcher.load and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.load == 0
            assert batcher.stats.steps < 4000  # stopped early, not at max_tokens
            assert request(url, "GET", "/health")[0] == 200
    finally:
        batcher.close()


def test_an_api_key_guards_everything_but_health(model, tokenizer) -> None:
    batcher = Batcher(model, tokenizer, wait_ms=0)
    try:
        with running_server(create_app(batcher, ServerSettings(MODEL, api_key="sesame"))) as url:
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
            keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
            assert chat(keyed, QUESTIONS[0], max_tokens=3).choices[0].message.content
            status, answer = request(url, "POST", "/v1/completions", b"{}")
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
            assert request(url, "GET", "/health")[0] == 200
    finally:
        batcher.close()


def test_the_plain_template_renders_a_conversation_turn_by_turn() -> None:
    from bitune.inference.server import Message

    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="2+2?"),
        Message(role="assistant", content="4"),
        Message(role="user", content=[{"type": "text", "text": "3+3?"}]),
    ]
    assert (
        _render_chat(messages, "plain", None)
        == "Be brief.\n\nQuestion: 2+2?\n\nAnswer: 4\n\nQuestion: 3+3?\n\nAnswer:"
    )


def test_the_cli_serves_on_localhost(tokenizer, tmp_path: Path) -> None:
    tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(
        tmp_path
    )
    tokenizer.save_pretrained(tmp_path)
    with socket.socket() as probe:  # a free port (closed again for the server to take)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "bitune", "serve", "--base-model", str(tmp_path), "--device", "cpu"]
    command += [
        "--port",
        str(port),
        "--model-name",
        "cli-model",
        "--max-tokens",
        "5",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "BITUNE_API_KEY": ""}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["cli-model"]
        response = client.completions.create(model="cli-model", prompt="mary went to the", temperature=0)
        assert response.usage.completion_tokens <= 5 and response.choices[0].finish_reason in (
            "stop",
            "length",
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert b"serving 'cli-model' at http://127.0.0.1:" in process.stdout.read()


@pytest.mark.slow
def test_smollm2_chat_through_its_own_chat_template(smollm2: Path) -> None:
    """The real tokenizer's chat template (and its <|im_end|> end of turn), greedy, plain and streamed."""
    from bitune.core.pretrained import load_for_inference

    torch.set_num_threads(os.cpu_count() or 1)
    try:
        model, tokenizer = load_for_inference(base_model=smollm2, device="cpu")
        batcher = Batcher(model, tokenizer, max_batch_size=4, wait_ms=10)
        settings = ServerSettings("smollm2", template="chat")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        with running_server(create_app(batcher, settings)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            arguments = dict(model="smollm2", messages=messages, max_tokens=16, temperature=0)
            answer = client.chat.completions.create(**arguments)
            streamed = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(**arguments, stream=True)
            )
        batcher.close()
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected = generate_text(model, tokenizer, [text], max_new_tokens=16, do_sample=False)[0]
        assert answer.choices[0].message.content == expected == streamed
        assert "Paris" in expected
        assert answer.usage.prompt_tokens == len(tokenizer(text)["input_ids"])
    finally:
        torch.set_num_threads(1)
