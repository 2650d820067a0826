"""Serving a trained model: dynamic batching (`batching`) behind an OpenAI-compatible HTTP API (`server`).

`bitune serve` (`bitune.cli.serve`) runs it; the server needs the `serve` extra (FastAPI and uvicorn).
"""
