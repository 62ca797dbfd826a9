"""Samplers: logits (batch, vocab) -> next token ids (batch,).

Order of operations in :func:`sample_next_token` (as in Hugging Face ``generate``): repetition penalty
-> temperature -> top-k -> top-p -> softmax -> multinomial draw with an optional seeded
``torch.Generator``. ``temperature == 0`` is greedy (argmax after the repetition penalty).
"""

from __future__ import annotations

import torch


class NonFiniteLogitsError(ValueError):
    """The model's logits hold NaN or +inf (or are all -inf): no token can be sampled from them."""


def check_logits(logits: torch.Tensor) -> None:
    """NonFiniteLogitsError for a row of ``logits`` (batch, vocab) whose largest value is not finite: a NaN
    or +inf anywhere (``amax`` propagates NaN), or every logit -inf. One reduction over the vocabulary."""
    peak = logits.detach().amax(dim=-1)                                       # (B,)
    bad = ~torch.isfinite(peak)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        kind = "NaN" if bool(torch.isnan(peak[bad]).any()) else ("+inf" if bool((peak[bad] > 0).any()) else "all -inf")
        raise NonFiniteLogitsError(
            f"the model produced {kind} logits (batch rows {rows[:8]}): its weights or activations are not finite; "
            "check the checkpoint (bitnet.load_model refuses NaN weights) and the inputs")


def check_seed(seed) -> None:
    """ValueError unless ``seed`` is None or an integer ``torch.Generator.manual_seed`` takes: [-2**63, 2**64)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64):
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {seed!r}"[:200])


def check_sampling_args(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        repetition_penalty: float = 1.0) -> None:
    """ValueError naming the argument and the allowed range for bad sampling settings."""
    if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}")


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty (Keskar et al. 2019): for every token id in ``previous`` (batch, T), divide a positive
    logit by ``penalty`` and multiply a negative one by it. ``penalty > 1`` discourages repeats."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    picked = logits.gather(-1, previous)                                      # (B, T)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, previous, picked)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set all but the ``k`` largest logits of each row to -inf (ties with the k-th value are kept)."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                      # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability sums to at least ``p``; the most likely token is always kept."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)       # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                                # probability of better tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    previous: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch,) from ``logits`` (batch, vocab); ``previous`` (batch, T) feeds the penalty.

    Raises :class:`NonFiniteLogitsError` (a ValueError) when a row of ``logits`` is NaN / +inf / all -inf."""
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    check_logits(logits)
    logits = logits.float()
    if previous is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, previous.to(logits.device, torch.int64), repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
