"""Batched greedy generation: many prompts at once, for offline work (self-distillation).

Speculative decoding serves one request at its lowest latency; an offline job that needs the
model's own answers to thousands of prompts wants throughput instead, and a batch of B prompts
decodes in little more than the time of one (the weights are read once per step for all rows).

Prompts are sorted by length and cut into batches of at most `batch_size` rows and
`batch_tokens` padded prompt tokens, left-padded, and decoded greedily with the model's KV cache
(Hugging Face ``generate``). A row stops at its first end-of-sequence token, which it keeps, as the
engine does. Greedy answers equal one-at-a-time greedy decoding up to float rounding: padding and
batched matrix products can, rarely, flip a near-tie between the two most likely tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from decoding.target import TargetModel


def greedy_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Indices of prompts grouped into batches: sorted by length (least padding), at most
    `batch_size` rows and at most `batch_tokens` padded prompt tokens per batch (a longer prompt
    goes alone)."""
    if batch_size < 1 or batch_tokens < 1:
        raise ValueError("batch_size and batch_tokens must be positive")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur is not None and len(cur) < batch_size and lengths[i] * (len(cur) + 1) <= batch_tokens:
            cur.append(i)
        else:
            batches.append([i])
    return batches


def _cut_at_eos(row: list[int], eos: frozenset[int]) -> list[int]:
    for j, t in enumerate(row):
        if t in eos:
            return row[: j + 1]
    return row


@torch.inference_mode()
def generate_greedy_batched(target: TargetModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                            batch_size: int = 16, batch_tokens: int = 16384,
                            on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy answers (new tokens only, ending with EOS when the model stopped by itself) to each
    prompt, in the order given. `on_batch(n)` is called after each batch with its row count."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = target.context_window
    for p in prompts:
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"a prompt of {len(p)} tokens plus {max_new_tokens} new ones exceeds the "
                             f"model's context of {limit}")
    eos = target.eos_token_ids
    pad = next(iter(sorted(eos))) if eos else 0
    out: list[list[int]] = [[] for _ in prompts]
    for idx in greedy_batches([len(p) for p in prompts], batch_size, batch_tokens):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):                      # left padding: every row ends at column width-1
            ids[r, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[r, width - len(prompts[i]):] = 1
        gen = target.model.generate(
            input_ids=ids.to(target.device), attention_mask=mask.to(target.device), do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None, pad_token_id=pad,
            temperature=None, top_p=None, top_k=None)
        for r, i in enumerate(idx):
            out[i] = _cut_at_eos(gen[r, width:].tolist(), eos)
        if on_batch is not None:
            on_batch(len(idx))
    return out
