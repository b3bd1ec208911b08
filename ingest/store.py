"""Original uploads, content-addressed by sha256, and extracted texts, written atomically."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "uploads").mkdir(parents=True, exist_ok=True)
        (root / "texts").mkdir(parents=True, exist_ok=True)

    def upload_path(self, sha256: str) -> Path:
        return self.root / "uploads" / sha256[:2] / sha256

    def text_path(self, document_id: int) -> Path:
        return self.root / "texts" / f"{document_id}.txt"

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.upload_path(sha)
        if not path.exists():
            self._atomic_write(path, data)
        return sha

    def get(self, sha256: str) -> bytes:
        return self.upload_path(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        self.upload_path(sha256).unlink(missing_ok=True)

    def put_text(self, document_id: int, text: str) -> None:
        self._atomic_write(self.text_path(document_id), text.encode("utf-8"))

    def get_text(self, document_id: int) -> str | None:
        try:
            return self.text_path(document_id).read_text("utf-8")
        except FileNotFoundError:
            return None

    def delete_text(self, document_id: int) -> None:
        self.text_path(document_id).unlink(missing_ok=True)
