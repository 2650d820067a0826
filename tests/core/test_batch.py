"""The batch layout: prompts padded left, answers padded right, checked on the way in."""

from __future__ import annotations

import pytest
import torch

from bitune import BituneInputError, collate, split_sequences
from bitune.core.batch import check_batch, left_pad


def test_collate_pads_prompts_left_and_answers_right():
    batch = collate([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]], pad_token_id=0)
    assert batch["prompt_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert batch["answer_ids"].tolist() == [[8, 2, 0], [9, 9, 2]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_split_sequences_recovers_prompts_and_answers(side):
    ids = (
        torch.tensor([[1, 5, 6, 8, 2], [1, 7, 9, 2, 0]])
        if side == "right"
        else torch.tensor([[1, 5, 6, 8, 2], [0, 1, 7, 9, 2]])
    )
    batch = split_sequences(ids, ids.ne(0).long(), [3, 2])
    expected = collate([[1, 5, 6], [1, 7]], [[8, 2], [9, 2]])
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key


def test_check_batch_rejects_wrong_layouts():
    batch = collate([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]])
    with pytest.raises(BituneInputError, match="answers must be padded on the right"):
        check_batch(**dict(batch, answer_mask=batch["answer_mask"].flip(-1)))
    with pytest.raises(BituneInputError, match="at least 1 token"):
        check_batch(**dict(batch, answer_mask=torch.zeros_like(batch["answer_mask"])))
    with pytest.raises(BituneInputError, match="2 prompts but 1 answers"):
        collate([[1, 2], [1, 3]], [[2]])


def test_left_pad_moves_real_tokens_to_the_end():
    out = left_pad(torch.tensor([[1, 2, 0], [1, 2, 3]]), torch.tensor([[1, 1, 0], [1, 1, 1]]), pad_token_id=0)
    assert out["input_ids"].tolist() == [[0, 1, 2], [1, 2, 3]]
