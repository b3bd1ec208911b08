"""A bounded LRU of KV states for prompt prefixes, keyed by their exact token ids."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    def __init__(self, max_entries: int = 8) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def lookup(self, ids: list[int]) -> tuple[int, KV] | None:
        """The longest stored prefix of `ids`: (its length, its KV [1, H, n, D] per layer)."""
        best: tuple[int, ...] | None = None
        with self._lock:
            for key in self._entries:
                n = len(key)
                if n <= len(ids) and (best is None or n > len(best)) and tuple(ids[:n]) == key:
                    best = key
            if best is None:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            return len(best), self._entries[best]

    def store(self, ids: list[int], kv: KV) -> None:
        if self.max_entries == 0 or not ids:
            return
        key = tuple(ids)
        with self._lock:
            self._entries[key] = kv
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
