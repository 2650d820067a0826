"""llama2.c -> Hugging Face conversion: the real stories260K model, its tokenizer, and bad inputs."""

import argparse
import struct
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitune.cli import convert as convert_command
from bitune.core.convert import convert_llama2c, read_llama2c_checkpoint, read_llama2c_tokenizer
from bitune.errors import BituneInputError

KNOWN_STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
ROUND_TRIP_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "",
    " leading space, trailing space ",
    "double  spaces\tand a tab\nand\n\nnewlines",
    "Unicode: café, “quotes” — ☃ 😀 日本語",
    "Numbers 1234567890 and symbols ~!@#$%^&*()_+{}|:<>?[]\\;',./`",
]


@pytest.fixture(scope="module")
def tokenizer(stories260k: Path):
    return AutoTokenizer.from_pretrained(stories260k)


@pytest.fixture(scope="module")
def real_files(shared_data: Path) -> tuple[Path, Path]:
    return shared_data / "models" / "stories260K.bin", shared_data / "models" / "tok512.bin"


def llama2c_encode(text: str, entries: list[tuple[str, float]]) -> list[int]:
    """Port of llama2.c's `encode()` (run.c, bos=1, eos=0): the behaviour the HF tokenizer must match."""
    pieces = [piece for piece, _ in entries]
    scores = [score for _, score in entries]
    index = {piece: token_id for token_id, piece in enumerate(pieces)}
    tokens = [index[" "]] if text else []  # the dummy prefix
    for char in text:
        tokens += [index[char]] if char in index else [byte + 3 for byte in char.encode()]
    while True:
        best = None  # (score, position, merged id); the leftmost pair wins ties, as in run.c
        for position, (left, right) in enumerate(pairwise(tokens)):
            merged = index.get(pieces[left] + pieces[right])
            if merged is not None and (best is None or scores[merged] > best[0]):
                best = (scores[merged], position, merged)
        if best is None:
            return [1, *tokens]
        _, position, merged = best
        tokens[position : position + 2] = [merged]


def write_llama2c_tokenizer(path: Path, entries: list[tuple[str, float]]) -> Path:
    records = [struct.pack("<fi", score, len(piece.encode())) + piece.encode() for piece, score in entries]
    path.write_bytes(struct.pack("<i", max(len(piece.encode()) for piece, _ in entries)) + b"".join(records))
    return path


def test_greedy_decoding_from_bos_reproduces_the_known_story(stories260k: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(stories260k)
    bos = torch.tensor([[tokenizer.bos_token_id]])
    generated = model.generate(bos, max_new_tokens=40, do_sample=False)
    assert tokenizer.decode(generated[0], skip_special_tokens=True).startswith(KNOWN_STORY)


def test_tokenizer_encodes_text_exactly_like_llama2c(tokenizer, real_files, shared_data: Path) -> None:
    entries = read_llama2c_tokenizer(real_files[1])
    lines = (shared_data / "corpus" / "tinystories.txt").read_text(encoding="utf-8").splitlines()
    texts = ROUND_TRIP_TEXTS + ["\n".join(lines[start : start + 4]) for start in range(0, 800, 4)]
    for text in texts:
        assert tokenizer(text).input_ids == llama2c_encode(text, entries), text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_text(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert tokenizer("Once upon").input_ids[0] == tokenizer.bos_token_id == 1
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 0)
    assert tokenizer.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    assert tokenizer.model_max_length == 512


def test_untied_checkpoint_keeps_its_classifier_and_permutes_rotary_rows(tmp_path: Path) -> None:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = 8, 16, 1, 2, 1, 512, 4
    head_dim, kv_dim = dim // n_heads, n_kv_heads * dim // n_heads
    sizes = [vocab_size * dim, dim, dim * dim, kv_dim * dim, kv_dim * dim, dim * dim, dim]
    sizes += [3 * hidden_dim * dim, dim, seq_len * head_dim, vocab_size * dim]  # w1-3, norm, RoPE, classifier
    values = torch.arange(sum(sizes), dtype=torch.float32)
    header = struct.pack("<7i", dim, hidden_dim, n_layers, n_heads, n_kv_heads, -vocab_size, seq_len)
    checkpoint = tmp_path / "untied.bin"
    checkpoint.write_bytes(header + values.numpy().tobytes())

    config, state_dict = read_llama2c_checkpoint(checkpoint)

    assert not config.tie_word_embeddings
    embedding, _, wq, wk = torch.split(values, sizes)[:4]
    assert torch.equal(state_dict["model.embed_tokens.weight"].flatten(), embedding)
    assert torch.equal(state_dict["lm_head.weight"].flatten(), values[-vocab_size * dim :])
    # Interleaved pairs (0,1),(2,3) of each 4-wide head become halves: rows 0,2 | 1,3 within the head.
    assert torch.equal(
        state_dict["model.layers.0.self_attn.q_proj.weight"], wq.view(dim, dim)[[0, 2, 1, 3, 4, 6, 5, 7]]
    )
    assert torch.equal(
        state_dict["model.layers.0.self_attn.k_proj.weight"], wk.view(kv_dim, dim)[[0, 2, 1, 3]]
    )


GARBAGE = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
MISSING = None


@pytest.mark.parametrize(
    ("bad_file", "corrupt", "expected"),
    [
        ("checkpoint", lambda data: data[:1_000_000], "truncated"),
        ("checkpoint", lambda data: data + bytes(4), "longer than its header says"),
        ("checkpoint", lambda data: data[:20], "too short"),
        ("checkpoint", lambda data: GARBAGE, "invalid llama2.c header"),
        ("checkpoint", lambda data: struct.pack("<I", 0x616B3432) + data[4:], "--version 0"),
        ("checkpoint", lambda data: MISSING, "not found"),
        ("tokenizer", lambda data: data[:3000], "truncated"),
        ("tokenizer", lambda data: GARBAGE, "not a llama2.c tokenizer"),
        ("tokenizer", lambda data: MISSING, "not found"),
    ],
)
def test_bad_file_is_named_and_nothing_is_written(tmp_path, real_files, bad_file, corrupt, expected) -> None:
    checkpoint, tokenizer = real_files
    bad_path = tmp_path / f"bad-{bad_file}.bin"
    bad_bytes = corrupt((checkpoint if bad_file == "checkpoint" else tokenizer).read_bytes())
    if bad_bytes is not MISSING:
        bad_path.write_bytes(bad_bytes)
    inputs = (bad_path, tokenizer) if bad_file == "checkpoint" else (checkpoint, bad_path)

    with pytest.raises(BituneInputError, match=expected) as raised:
        convert_llama2c(*inputs, tmp_path / "out")

    assert str(bad_path) in str(raised.value)
    assert sorted(tmp_path.iterdir()) == ([bad_path] if bad_bytes is not MISSING else [])


@pytest.mark.parametrize(
    ("select_entries", "expected"),
    [
        (lambda entries: entries[:300], "has 300 tokens but checkpoint"),
        (lambda entries: entries[:3] + entries[259:], "byte-fallback pieces"),
        (lambda entries: [*entries[:-1], entries[-2]], "repeats pieces"),
    ],
)
def test_tokenizer_that_does_not_fit_the_model_is_rejected(
    tmp_path, real_files, select_entries, expected
) -> None:
    checkpoint, tokenizer = real_files
    bad_tokenizer = write_llama2c_tokenizer(
        tmp_path / "tok.bin", select_entries(read_llama2c_tokenizer(tokenizer))
    )
    with pytest.raises(BituneInputError, match=expected) as raised:
        convert_llama2c(checkpoint, bad_tokenizer, tmp_path / "out")
    assert str(bad_tokenizer) in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_folder_is_kept_unless_overwrite(tmp_path, real_files) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")

    with pytest.raises(BituneInputError, match="not empty"):
        convert_llama2c(*real_files, output_dir)
    assert [path.name for path in output_dir.iterdir()] == ["notes.txt"]

    convert_llama2c(*real_files, output_dir, overwrite=True)
    assert not (output_dir / "notes.txt").exists()
    assert (output_dir / "model.safetensors").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no staging or retired folder left behind


def test_cli_command_converts_into_a_loadable_folder(tmp_path, real_files, capsys) -> None:
    parser = argparse.ArgumentParser(prog="bitune convert-llama2c")
    convert_command.add_arguments(parser)
    assert "llama2.c" in parser.format_help()
    output_dir = tmp_path / "nested" / "stories260k"

    exit_code = convert_command.run(parser.parse_args([*map(str, real_files), str(output_dir)]))

    assert exit_code == 0
    assert str(output_dir) in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.num_hidden_layers == 5
