"""Turning logits into the target's token distribution (temperature, top-k, top-p)."""

from __future__ import annotations

import torch

from decoding.config import SamplingParams


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] after temperature, top-k and top-p (nucleus) filtering.

    Requires a sampling temperature (not ``params.greedy``). Filters follow the usual order: top-k, then top-p on what is left.
    """
    if params.greedy:
        raise ValueError("sampling_probs needs a sampling temperature; greedy decoding uses argmax")
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass. The running
        # mass is summed in float64: in float32 it stalls near 1 (steps of ~6e-8 there), where a
        # long tail's tiny probabilities fall, and the cut would land tokens away from the true one.
        sorted_probs = sorted_scores.double().softmax(-1)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1)


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def greedy_token(logits: torch.Tensor) -> int:
    """argmax of one position's logits [V], the first maximum. On a CPU through numpy: torch's
    CPU argmax takes ~80 us over a 49k vocabulary, numpy's ~10 (a verification step takes one
    per accepted node); both return the first maximal index."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return int(logits.detach().numpy().argmax())
    return int(torch.argmax(logits))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a single position's logits [V]: argmax when greedy, else a draw."""
    if params.greedy:
        return greedy_token(logits)
    probs = sampling_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator))
