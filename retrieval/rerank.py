"""Reranking interface: none by default (no cross-encoder ships offline), or a local folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from retrieval.compute_thread import run_in_own_thread


class Reranker(Protocol):
    name: str

    def score(self, query: str, passages: Sequence[str]) -> list[float]: ...


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder loaded from a local folder."""

    def __init__(self, folder: Path, *, device: str = "cpu") -> None:
        from sentence_transformers import CrossEncoder

        if not (folder / "config.json").is_file():
            raise ValueError(f"reranker folder {folder} has no config.json")
        self.name = folder.name
        self.model = CrossEncoder(str(folder), device=device, local_files_only=True)

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        pairs = [(query, p) for p in passages]
        # A thread that ends with the call: see compute_thread (keeps decode steps fast).
        return [float(s) for s in run_in_own_thread(lambda: self.model.predict(pairs))]
