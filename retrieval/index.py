"""The dense vector index: FAISS keyed by chunk id, persisted atomically with a sidecar.

The sidecar (`index.json`) records the embedder name, dimension, index type and a version
that grows with every save; another process (an API replica) notices the new version and
reloads. Loading an index made by another embedder is refused with the fix. The database
holds every vector too, so this index can always be rebuilt from it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"
LOCK_FILE = "index.lock"
INDEX_TYPES = ("flat", "hnsw", "ivf")


class IndexMismatch(Exception):
    """The index on disk was built by another embedder or dimension."""


@dataclass(frozen=True)
class IndexMeta:
    embedder: str
    dim: int
    index_type: str
    version: int
    count: int


def _new_faiss(dim: int, index_type: str, n_hint: int) -> faiss.Index:
    """Inner product on L2-normalised vectors is cosine similarity."""
    if index_type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if index_type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 128
        return faiss.IndexIDMap2(hnsw)
    if index_type == "ivf":
        # IVF needs at least `nlist` training points; small corpora get few lists.
        nlist = max(1, min(4096, int(np.sqrt(max(n_hint, 1)) * 4), max(n_hint, 1)))
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = min(nlist, 32)
        return faiss.IndexIDMap2(ivf)
    raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class VectorIndex:
    """A thread-safe FAISS index in `folder`, reloaded when another process saved a newer one."""

    def __init__(
        self,
        folder: Path,
        *,
        embedder: str,
        dim: int,
        index_type: str = "flat",
        save_interval_s: float = 0.0,
    ) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        self.folder = folder
        self.embedder = embedder
        self.dim = dim
        self.index_type = index_type
        self.version = 0
        self._lock = threading.RLock()
        self._index = _new_faiss(dim, index_type, 0)
        self._sidecar_mtime = 0.0
        # HNSW cannot remove vectors: removed ids are remembered and filtered from results
        # until the next rebuild (`ragqa reindex`) compacts them away.
        self._tombstones: set[int] = set()
        # Changes since the last save. Saving rewrites the whole file, so a busy worker
        # saves at most every `save_interval_s` and keeps the changes here meanwhile; if
        # another process saved in between, its file is loaded and these are replayed.
        # A crash loses only the journal, which `Pipeline.reconcile` restores from the
        # vectors stored in the database.
        self.save_interval_s = save_interval_s
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        self._last_save = 0.0
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / SIDECAR_FILE).exists():
            self._load()

    # -- persistence ---------------------------------------------------------------
    def read_meta(self) -> IndexMeta | None:
        try:
            raw = json.loads((self.folder / SIDECAR_FILE).read_text())
        except (OSError, ValueError):
            return None
        return IndexMeta(
            raw["embedder"], int(raw["dim"]), raw["index_type"], int(raw["version"]), raw["count"]
        )

    def _read_tombstones(self) -> set[int]:
        try:
            raw = json.loads((self.folder / SIDECAR_FILE).read_text())
        except (OSError, ValueError):
            return set()
        return {int(i) for i in raw.get("tombstones", [])}

    def _load(self) -> None:
        meta = self.read_meta()
        if meta is None:
            return
        if meta.embedder != self.embedder or meta.dim != self.dim:
            raise IndexMismatch(
                f"index was built with {meta.embedder} ({meta.dim}-d) but the embedder is "
                f"{self.embedder} ({self.dim}-d): run 'ragqa reindex'"
            )
        index = faiss.read_index(str(self.folder / INDEX_FILE))
        with self._lock:
            self._index = index
            self._tombstones = self._read_tombstones()
            self.version = meta.version
            self._sidecar_mtime = (self.folder / SIDECAR_FILE).stat().st_mtime
        logger.info("loaded index v%d with %d vectors", meta.version, index.ntotal)

    def refresh(self) -> bool:
        """Reload if another process saved a newer version; True when it reloaded."""
        try:
            mtime = (self.folder / SIDECAR_FILE).stat().st_mtime
        except OSError:
            return False
        if mtime == self._sidecar_mtime:
            return False
        meta = self.read_meta()
        if meta is None or meta.version == self.version:
            self._sidecar_mtime = mtime
            return False
        with self._lock:
            journal = list(self._journal)
            self._load()
            # Changes of ours not saved yet go on top of the other process's file.
            for op, ids, vectors in journal:
                if op == "add":
                    self._apply_add(ids, vectors)  # type: ignore[arg-type]
                else:
                    self._apply_remove(ids)
            self._journal = journal
        return True

    def save(self) -> None:
        """Write the index then the sidecar, each to a temp name moved into place."""
        with self._lock:
            self.version += 1
            data = faiss.serialize_index(self._index).tobytes()
            _fsync_write(self.folder / INDEX_FILE, data)
            meta = {
                "embedder": self.embedder,
                "dim": self.dim,
                "index_type": self.index_type,
                "version": self.version,
                "count": len(self),
                "tombstones": sorted(self._tombstones),
                "saved_at": time.time(),
            }
            _fsync_write(self.folder / SIDECAR_FILE, json.dumps(meta).encode())
            self._sidecar_mtime = (self.folder / SIDECAR_FILE).stat().st_mtime
            self._journal = []
            self._last_save = time.monotonic()

    @contextmanager
    def writing(self, *, force_save: bool = False) -> Iterator[VectorIndex]:
        """Exclusive write across processes: reload the newest, apply changes, save when due."""
        with (self.folder / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._sync_from_disk()
                yield self
                due = time.monotonic() - self._last_save >= self.save_interval_s
                if force_save or due:
                    self.save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _sync_from_disk(self) -> None:
        self.refresh()

    @property
    def dirty(self) -> bool:
        return bool(self._journal)

    def flush(self) -> None:
        """Save pending changes now (the worker calls this when the queue is idle)."""
        if self._journal:
            with self.writing(force_save=True):
                pass

    # -- contents ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids())

    def ids(self) -> np.ndarray:
        """All live chunk ids in the index (int64 [n])."""
        with self._lock:
            ids = np.unique(faiss.vector_to_array(self._index.id_map).astype(np.int64))
            if self._tombstones:
                ids = ids[~np.isin(ids, list(self._tombstones))]
            return ids

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Add or replace vectors: ids [n], vectors float32 [n, dim]."""
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(
                f"vectors must have shape ({len(ids)}, {self.dim}), got {vectors.shape}"
            )
        id_array = np.asarray(ids, dtype=np.int64)
        with self._lock:
            self._apply_add(id_array, vectors)
            self._journal.append(("add", id_array, vectors))

    def _apply_add(self, id_array: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            if self.index_type == "hnsw":
                self._tombstones.difference_update(id_array.tolist())
            else:
                self._index.remove_ids(id_array)  # IDMap2 allows duplicates; keep ids unique
            if self.index_type == "ivf" and not self._index.is_trained:
                self._index = _new_faiss(self.dim, "ivf", len(vectors))
                self._index.train(vectors)
            self._index.add_with_ids(vectors, id_array)

    def remove(self, ids: Sequence[int]) -> int:
        if len(ids) == 0:
            return 0
        id_array = np.asarray(ids, dtype=np.int64)
        with self._lock:
            self._journal.append(("remove", id_array, None))
            return self._apply_remove(id_array)

    def _apply_remove(self, ids: np.ndarray) -> int:
        with self._lock:
            if self.index_type == "hnsw":
                present = set(self.ids().tolist())
                gone = present & {int(i) for i in ids.tolist()}
                self._tombstones |= gone
                return len(gone)
            return int(self._index.remove_ids(ids))

    def reset(self, n_hint: int = 0) -> None:
        with self._lock:
            self._index = _new_faiss(self.dim, self.index_type, n_hint)
            self._tombstones = set()
            self._journal = []

    @property
    def exact_within(self) -> bool:
        """Whether `search(within=...)` is exact (a flat index scans every allowed vector)."""
        return self.index_type == "flat"

    def search(
        self, queries: np.ndarray, k: int, within: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [q, dim] -> (scores [q, k], ids [q, k]); missing slots have id -1.

        `within` restricts the search to those chunk ids inside FAISS (no extra reads).
        """
        self.refresh()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            shape = (queries.shape[0], k)
            scores = np.zeros(shape, np.float32)
            out = np.full(shape, -1, np.int64)
            total = int(self._index.ntotal)
            if total == 0:
                return scores, out
            fetch = min(total, k + len(self._tombstones))
            params = None
            if within is not None:
                selector = faiss.IDSelectorBatch(np.asarray(within, dtype=np.int64))
                params = faiss.SearchParameters(sel=selector)
            raw_scores, raw_ids = self._index.search(queries, fetch, params=params)
        for row in range(queries.shape[0]):
            seen: set[int] = set()
            col = 0
            for score, chunk_id in zip(raw_scores[row], raw_ids[row], strict=True):
                cid = int(chunk_id)
                if cid < 0 or cid in seen or cid in self._tombstones:
                    continue
                seen.add(cid)
                scores[row, col], out[row, col] = score, cid
                col += 1
                if col == k:
                    break
        return scores, out

    def describe(self) -> dict[str, object]:
        return {
            "embedder": self.embedder,
            "dim": self.dim,
            "type": self.index_type,
            "version": self.version,
            "vectors": len(self),
            "tombstones": len(self._tombstones),
        }
