"""Batches of (prompt, answer) pairs in the one layout Bitune needs.

Prompts are padded on the left and answers on the right, so every prompt ends in the same column and every
answer starts in the next one:

    prompt_ids   [pad pad  p0 p1 p2]     answer_ids   [a0 a1 pad]
    prompt_ids   [ p0  p1  p2 p3 p4]     answer_ids   [a0 a1  a2]

The boundary between prompt and answer is part of the layout, so it cannot be got wrong: build batches with
`collate` (token lists) or `split_sequences` (one sequence plus per-sample prompt lengths), and `check_batch`
rejects anything else with a message that says how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bitune.errors import BituneInputError

Batch = dict[str, torch.Tensor]


def collate(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_token_id: int = 0
) -> Batch:
    """Pad token lists into a Bitune batch: prompts on the left, answers on the right.

    Example:
        >>> batch = collate([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]])
        >>> batch["prompt_ids"].tolist(), batch["answer_mask"].tolist()
        ([[1, 5, 6], [0, 1, 7]], [[1, 1, 0], [1, 1, 1]])
    """
    if len(prompts) != len(answers):
        raise BituneInputError(f"got {len(prompts)} prompts but {len(answers)} answers")
    prompt_ids, prompt_mask = _pad([list(p) for p in prompts], pad_token_id, left=True)
    answer_ids, answer_mask = _pad([list(a) for a in answers], pad_token_id, left=False)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
    }
    check_batch(**batch)
    return batch


def split_sequences(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: Sequence[int] | torch.Tensor,
    pad_token_id: int = 0,
) -> Batch:
    """Cut padded full sequences (either padding side) into a Bitune batch at per-sample prompt lengths.

    Example:
        >>> ids = torch.tensor([[1, 5, 6, 8, 2], [0, 1, 7, 9, 2]])
        >>> split_sequences(ids, ids.ne(0).long(), [3, 2])["answer_ids"].tolist()
        [[8, 2], [9, 2]]
    """
    lengths = torch.as_tensor(prompt_lengths).tolist()
    prompts, answers = [], []
    for row, mask, length in zip(input_ids, attention_mask.bool(), lengths):
        tokens = row[mask].tolist()
        if not 0 < length < len(tokens):
            raise BituneInputError(
                f"prompt length {length} leaves no answer in a sequence of {len(tokens)} real tokens; "
                "prompt_lengths must count the prompt's tokens only (BOS included)"
            )
        prompts.append(tokens[:length])
        answers.append(tokens[length:])
    return collate(prompts, answers, pad_token_id)


def check_batch(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor
) -> None:
    """Raise `BituneInputError` unless the tensors follow the layout described in this module."""
    if prompt_ids.shape != prompt_mask.shape or answer_ids.shape != answer_mask.shape:
        raise BituneInputError("each of prompt_ids/answer_ids needs a mask of the same shape")
    if prompt_ids.shape[0] != answer_ids.shape[0]:
        raise BituneInputError(
            f"{prompt_ids.shape[0]} prompts but {answer_ids.shape[0]} answers in the batch"
        )
    if prompt_ids.shape[1] < 2 or (prompt_mask.sum(-1) < 2).any():
        raise BituneInputError(
            "every prompt needs at least 2 tokens (Bitune encodes all but the last one twice); add a BOS token"
        )
    if not _is_padded(prompt_mask, left=True):
        raise BituneInputError(
            "prompts must be padded on the left (prompt_mask like [0, 0, 1, 1]); build batches with "
            "bitune.core.batch.collate or bitune.core.batch.split_sequences"
        )
    if answer_ids.shape[1] == 0 or (answer_mask.sum(-1) < 1).any():
        raise BituneInputError("every answer needs at least 1 token (usually the answer text plus EOS)")
    if not _is_padded(answer_mask, left=False):
        raise BituneInputError(
            "answers must be padded on the right (answer_mask like [1, 1, 0]); build batches with "
            "bitune.core.batch.collate or bitune.core.batch.split_sequences"
        )


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so padding never shifts them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_left(rows: Sequence[Sequence[int]], pad_token_id: int = 0) -> Batch:
    """`input_ids` and `attention_mask` of token lists padded on the left (for generation).

    Example:
        >>> pad_left([[1, 2], [1, 2, 3]])["input_ids"].tolist()
        [[0, 1, 2], [1, 2, 3]]
    """
    ids, mask = _pad([list(r) for r in rows], pad_token_id, left=True)
    return {"input_ids": ids, "attention_mask": mask}


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int = 0) -> Batch:
    """Move every row's real tokens to the right edge (generation continues from the last column)."""
    rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    return {k: v.to(input_ids.device) for k, v in pad_left(rows, pad_token_id).items()}


def _pad(rows: list[list[int]], pad_token_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _is_padded(mask: torch.Tensor, left: bool) -> bool:
    """True when each row is a run of zeros then ones (left) or ones then zeros (right)."""
    mask = mask.long()
    steps = mask[:, 1:] - mask[:, :-1]
    return bool((steps >= 0).all()) if left else bool((steps <= 0).all())
