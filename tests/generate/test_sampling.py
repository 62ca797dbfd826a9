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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_non_finite_logits_are_a_clear_error(bad, temperature):
    from bitnet.generate.sampling import NonFiniteLogitsError

    logits = torch.zeros(2, 10)
    logits[1, 3] = bad
    with pytest.raises(NonFiniteLogitsError, match=r"(NaN|\+inf) logits \(batch rows \[1\]\)"):
        sample_next_token(logits, temperature=temperature)     # greedy used to return the NaN's index
    with pytest.raises(NonFiniteLogitsError, match="all -inf"):
        sample_next_token(torch.full((1, 4), float("-inf")), temperature=temperature)
    ok = torch.tensor([[0.0, float("-inf"), 1.0]])                # masked entries are fine
    assert sample_next_token(ok, temperature=0).tolist() == [2]


def test_seed_must_fit_a_torch_generator():
    from bitnet.generate.sampling import check_seed

    for seed in (None, 0, -2 ** 63, 2 ** 64 - 1):
        check_seed(seed)
    for seed in (2 ** 64, -2 ** 63 - 1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="seed"):
            check_seed(seed)
