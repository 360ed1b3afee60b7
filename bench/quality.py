"""Quality measures for lossy decoding: answer accuracy, agreement with the lossless output."""

from __future__ import annotations

import re

import torch

_HASH = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUM = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_answer(text: str) -> str | None:
    """The final number: after '####' when the model writes it, else the last number in the text."""
    m = _HASH.search(text)
    raw = m.group(1) if m else (_NUM.findall(text) or [None])[-1]
    if raw is None:
        return None
    raw = raw.replace(",", "").rstrip(".")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def token_agreement(a: list[int], b: list[int]) -> float:
    """Share of positions (over the longer output) where the two token sequences agree."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def rouge_l(a: list, b: list) -> float:
    """ROUGE-L F1 over tokens (longest common subsequence)."""
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def mean_logprob(target, prompt_ids: list[int], output_ids: list[int]) -> float:
    """The target's mean log-probability per generated token (greedy distribution, T = 1)."""
    if not output_ids:
        return float("nan")
    _, out = target.prefill(prompt_ids + output_ids[:-1], all_logits=True)
    logp = torch.log_softmax(out.logits[len(prompt_ids) - 1:], dim=-1)
    return float(logp[torch.arange(len(output_ids)), torch.tensor(output_ids)].mean())
