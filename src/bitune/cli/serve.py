"""`bitune serve`: an OpenAI-compatible HTTP server for a trained model (`bitune.inference.server`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bitune.cli.common import HelpFormatter, add_device_arguments, add_quantization_argument, model_source
from bitune.core.pretrained import load_for_inference
from bitune.errors import BituneInputError

HELP = "serve a trained model over an OpenAI-compatible HTTP API, with dynamic batching"

API_KEY_VARIABLE = "BITUNE_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` arguments to `parser`."""
    parser.formatter_class = HelpFormatter
    parser.description = (
        "Serve a Bitune checkpoint (or a merged export, a plain PEFT adapter or a base model) over an "
        "OpenAI-compatible HTTP API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET "
        "/health. Requests that arrive together are prefilled and decoded as one batch. Needs the serve extra: "
        "pip install 'bitune[serve]'."
    )
    parser.epilog = f"""\
examples:
  bitune serve --checkpoint runs/bitune/final
  bitune serve --checkpoint runs/bitune/final --template chat --port 8080 --api-key secret
  bitune serve --base-model HuggingFaceTB/SmolLM2-135M-Instruct --template chat --quantization 4bit

then, with the openai package:
  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
  client.chat.completions.create(model=MODEL_NAME, messages=[{{"role": "user", "content": "Hi"}}])

The API key can also come from the environment variable {API_KEY_VARIABLE}.
"""
    model = parser.add_argument_group(
        "model (a Bitune checkpoint, or a base model with an optional PEFT adapter)"
    )
    model.add_argument(
        "--checkpoint", type=Path, metavar="DIR", help="a Bitune checkpoint folder, or a merged export"
    )
    model.add_argument(
        "--base-model",
        metavar="NAME_OR_PATH",
        help="base model (with --checkpoint: overrides the one it names)",
    )
    model.add_argument(
        "--peft-adapter", type=Path, metavar="DIR", help="a plain PEFT adapter, on --base-model"
    )
    model.add_argument(
        "--tokenizer", help="tokenizer path or hub id (default: the checkpoint's, else the base model's)"
    )
    add_device_arguments(model)
    add_quantization_argument(model)
    model.add_argument(
        "--model-name",
        help="the name clients send as `model` (default: the checkpoint or base model as given)",
    )
    model.add_argument(
        "--template",
        default="plain",
        choices=["plain", "chat"],
        help='how chat messages become a prompt: "plain" (Question: …\\n\\nAnswer:, as Bitune trains by '
        'default) or "chat" (the tokenizer\'s chat template)',
    )

    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--api-key",
        help=f"require Authorization: Bearer KEY on every request but /health (or set {API_KEY_VARIABLE})",
    )
    server.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="the most sequences decoded together (n choices count n)",
    )
    server.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long an idle server waits for more requests before it starts a batch",
    )
    server.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="new tokens per choice for requests that set no max_tokens",
    )
    server.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def run(args: argparse.Namespace) -> int:
    """Run the `serve` command until interrupted; returns the exit code."""
    try:
        from bitune.inference.server import ServerSettings, create_app, serve
    except ImportError as error:
        raise BituneInputError(
            f"bitune serve needs the serve extra ({error}): pip install 'bitune[serve]'"
        ) from None
    from bitune.inference.batching import Batcher

    if args.checkpoint is None and args.base_model is None:
        raise BituneInputError("name the model to serve: --checkpoint DIR, or --base-model PATH")
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    settings = ServerSettings(
        model_name=args.model_name or str(args.checkpoint or args.base_model),
        template=args.template,
        api_key=api_key,
        default_max_tokens=args.max_tokens,
    )
    model, tokenizer = load_for_inference(**model_source(args))
    if settings.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise BituneInputError("--template chat: the tokenizer has no chat template; use --template plain")
    batcher = Batcher(model, tokenizer, max_batch_size=args.max_batch_size, wait_ms=args.batch_wait_ms)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"bitune serve: warning: listening on {args.host} without an API key")
    print(
        f"serving {settings.model_name!r} at http://{args.host}:{args.port}/v1 (template {settings.template})"
    )
    try:
        serve(create_app(batcher, settings), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        batcher.close()
    return 0
