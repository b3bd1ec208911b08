"""Turning next-token logits into a token: repetition penalty, temperature, top-k, top-p.

Same definitions as transformers' logits processors, so seeded sampling can be checked
against a plain reference implementation.
"""

from __future__ import annotations

import torch

from generation.params import GenerationParams


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """logits [V], seen [n] token ids: divide positive scores, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(0, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(0, seen, scores)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability adds up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - p)
    remove[-1] = False  # the most likely token always stays
    return logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))


def sample(
    logits: torch.Tensor,
    params: GenerationParams,
    seen: torch.Tensor,
    generator: torch.Generator | None,
    suppress: torch.Tensor | None = None,
) -> int:
    """logits [V] (any float dtype) -> the next token id; `suppress` ids are never chosen."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if suppress is not None:
        logits = logits.index_fill(0, suppress, float("-inf"))
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
