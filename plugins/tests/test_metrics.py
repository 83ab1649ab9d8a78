"""The token NLL every benchmark perplexity is built from, against closed forms."""
from __future__ import annotations

import math

import torch

from overdrive.metrics import token_nll


def test_uniform_logits_give_log_vocab_per_token():
    logits = torch.full((2, 5, 7), 3.25)
    targets = torch.randint(0, 7, (2, 5))
    assert math.isclose(token_nll(logits, targets), 10 * math.log(7), rel_tol=1e-12)


def test_each_position_scores_its_own_target():
    # two classes with logits (0, log 3): p = 1/4 and 3/4, whatever the batch shape
    logits = torch.tensor([[0.0, math.log(3)]] * 3, dtype=torch.float32).reshape(1, 3, 2)
    targets = torch.tensor([[0, 1, 1]])
    expected = -math.log(0.25) - 2 * math.log(0.75)
    assert math.isclose(token_nll(logits, targets), expected, rel_tol=1e-6)
