"""BitNetTransformer: the tutorial call form, KV-cache decoding, training signal, errors."""

import pytest
import torch
from torch import nn

import bitnet
from bitnet import BitLinear, BitNetTransformer


def test_tutorial_call_form_shape():
    model = BitNetTransformer(num_tokens=20000, dim=1024, depth=6, heads=8, ff_mult=4)
    with torch.no_grad():
        logits = model(torch.randint(0, 20000, (1, 1024)))
    assert logits.shape == (1, 1024, 20000)


def tiny(weights="1.58", **kw):
    torch.manual_seed(0)
    return BitNetTransformer(num_tokens=40, dim=32, depth=2, heads=4, kv_heads=2, max_seq_len=64,
                             weights=weights, **kw)


def test_cached_and_uncached_logits_agree():
    model = tiny().eval()
    tokens = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(2, 32)
        steps = [model(tokens[:, :4], caches, 0)] + [model(tokens[:, t:t + 1], caches, t) for t in range(4, 11)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("weights", ["1.58", "1", "fp"])
def test_weights_choice_builds_same_architecture(weights):
    model = tiny(weights)
    linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7
    assert all(isinstance(m, BitLinear) == (weights != "fp") for m in linears)
    assert not isinstance(model.head, BitLinear) and isinstance(model.embed, nn.Embedding)


@pytest.mark.parametrize("weights", ["1.58", "1"])
def test_a_few_steps_lower_the_loss(weights):
    model = tiny(weights)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    data = torch.arange(33).remainder(40).repeat(4, 1)           # a fixed, learnable sequence
    x, y = data[:, :-1], data[:, 1:]
    first = model.loss(x, y).item()
    for _ in range(45):                       # 30 left the binary model at 0.49-0.54 of `first`: on the edge
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    assert model.loss(x, y).item() < 0.5 * first


def test_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 39\]"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="heads=3 .*dim=32"):
        BitNetTransformer(num_tokens=10, dim=32, depth=1, heads=3)
    with pytest.raises(ValueError, match="kv_heads=3 .*query_heads=4"):
        BitNetTransformer(num_tokens=10, dim=32, depth=1, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="weights must be one of"):
        BitNetTransformer(num_tokens=10, dim=32, depth=1, heads=4, weights="2")


def test_rows_at_different_positions_decode_like_separate_sequences():
    """Continuous batching: two prompts of different lengths share each decode step."""
    model = tiny().eval()
    prompts = [torch.randint(0, 40, (1, 5)), torch.randint(0, 40, (1, 9))]
    nxt = torch.randint(0, 40, (2, 1))
    with torch.no_grad():
        alone = [model(torch.cat([p, nxt[i:i + 1]], 1))[:, -1] for i, p in enumerate(prompts)]
        caches = model.new_caches(2, 32)
        for i, p in enumerate(prompts):
            model(p, [c.row(i) for c in caches], 0)                     # prefill row i only
        positions = torch.tensor([5, 9])
        together = model(nxt, caches, positions)[:, -1]                 # one step, rows at 5 and 9
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pack", [False, True])
def test_logits_to_keep_gives_the_last_rows(pack):
    torch.manual_seed(0)
    model = BitNetTransformer(num_tokens=50, dim=64, depth=2, heads=4, max_seq_len=32).eval()
    if pack:
        bitnet.pack(model)
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        assert torch.allclose(model(tokens, logits_to_keep=1), full[:, -1:], atol=1e-6)
        assert torch.allclose(model(tokens, logits_to_keep=3), full[:, -3:], atol=1e-6)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(tokens, logits_to_keep=bad)
