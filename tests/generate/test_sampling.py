import pytest
import torch

from bitnet.generate import apply_repetition_penalty, sample_next_token, top_k_filter, top_p_filter


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = top_k_filter(logits, 5)
    kept = torch.isfinite(out)
    assert kept.sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))
    assert torch.equal(out[kept], logits[kept])


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1         # top token always kept
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.75)).tolist() == [[False, True, False, True]]


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]
    logits = torch.tensor([[3.0, 2.9]])
    assert int(sample_next_token(logits, 0)) == 0
    assert int(sample_next_token(logits, 0, repetition_penalty=1.5, previous=torch.tensor([[0]]))) == 1


def test_greedy_seeded_and_argument_errors():
    logits = torch.randn(1, 100)
    assert int(sample_next_token(logits, temperature=0)) == int(logits.argmax())
    draws = lambda s: [int(sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(s)))  # noqa: E731
                       for _ in range(1)]
    assert draws(3) == draws(3)
    assert int(sample_next_token(logits, 1.0, top_k=1)) == int(logits.argmax())
    for kwargs, name in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                         ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                         ({"repetition_penalty": 0}, "repetition_penalty")]:
        with pytest.raises(ValueError, match=name):
            sample_next_token(logits, **kwargs)
