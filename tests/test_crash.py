"""SIGKILL the worker process in the middle of a large document; a new worker finishes it."""

import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from app.settings import Settings
from app.wiring import build_ingest
from ingest import detect, repo
from ingest.db import make_engine, make_session_factory, migrate
from ingest.parse import DocInfo, parse
from ingest.schema import Chunk, Document
from tests.conftest import MODEL_DIR, wait_for


def _large_markdown() -> bytes:
    sections = []
    for s in range(40):
        paras = [
            f"Section {s} paragraph {p}: the committee reviewed item {s * 100 + p} and "
            "recorded its findings about budgets, schedules and the quality of the work. " * 3
            for p in range(12)
        ]
        sections.append(f"## Topic {s}\n\n" + "\n\n".join(paras))
    return ("# Minutes\n\n" + "\n\n".join(sections)).encode()


def _start_worker(env):
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_worker_killed_mid_document_recovers_to_same_chunk_count(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", model_dir=MODEL_DIR, job_lease_s=3)
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    parts = build_ingest(settings, sessions)
    data = _large_markdown()
    _, expected = parts.pipeline.chunker.chunk(parse(data, detect.MARKDOWN, DocInfo()))
    sha = parts.store.put(data)
    with sessions() as s:
        doc, _, _ = repo.create_document(
            session=s,
            collection="default",
            filename="minutes.md",
            sha256=sha,
            mime=detect.MARKDOWN.mime,
            size=len(data),
            metadata={},
        )
        s.commit()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAGQA_")},
        "RAGQA_DATA_DIR": str(settings.data_dir),
        "RAGQA_MODEL_DIR": str(MODEL_DIR),
        "RAGQA_JOB_LEASE_S": "3",
        "RAGQA_LOG_LEVEL": "WARNING",
    }

    def status():
        with sessions() as s:
            return s.get(Document, doc.id).status

    first = _start_worker(env)
    try:
        wait_for(lambda: status() == "processing", timeout=120, what="worker to start the job")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert status() == "processing"  # killed mid-document: no half state became "ready"
    second = _start_worker(env)
    try:
        wait_for(lambda: status() in ("ready", "failed"), timeout=180, what="recovery")
    finally:
        second.terminate()
        second.wait(timeout=60)
    with sessions() as s:
        doc_row = s.get(Document, doc.id)
        assert doc_row.status == "ready", doc_row.error
        count = s.execute(
            select(func.count()).select_from(Chunk).where(Chunk.document_id == doc.id)
        ).scalar_one()
    assert count == len(expected)
    verify = subprocess.run(
        [sys.executable, "-m", "app.cli", "reindex", "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "ok: database and index agree" in verify.stdout
