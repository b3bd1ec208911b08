"""The worker loop: claim a job, hold its lease while working, record the outcome.

Runs as a thread inside `ragqa serve` or as its own process (`ragqa worker`). Any
exception from one document becomes that document's recorded failure; the loop itself
keeps going. Unreadable documents (ParseError) fail at once; other errors are retried
with backoff up to `max_attempts`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from ingest import queue
from ingest.parse import ParseError
from ingest.pipeline import Pipeline
from ingest.schema import IngestJob, JobKind

logger = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        pipeline: Pipeline,
        lease_s: float = 60.0,
        max_attempts: int = 3,
        poll_s: float = 0.5,
        backoff_s: float = 2.0,
        on_job_done: Callable[[IngestJob, str], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.pipeline = pipeline
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.owner = worker_id()
        self.on_job_done = on_job_done
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="ragqa-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Cut the idle wait short: a job was just queued."""
        self._wake.set()

    def request_stop(self) -> None:
        """Ask the loop to finish the current job and return (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        logger.info("worker %s started", self.owner)
        try:
            self.pipeline.reconcile()
        except Exception:
            logger.exception("index reconcile at start failed")
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # database down, disk full: log, wait, try again
                logger.exception("worker loop error")
                worked = False
            if not worked:
                try:
                    self.pipeline.index.flush()  # idle: persist what a busy spell deferred
                except Exception:
                    logger.exception("index save failed")
                self._wake.wait(self.poll_s)
                self._wake.clear()
        self.pipeline.index.flush()
        logger.info("worker %s stopped", self.owner)

    # -- one job ---------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and process one job; False when there was nothing to do."""
        with self.sessions() as session, session.begin():
            queue.fail_exhausted(session=session, max_attempts=self.max_attempts)
        job = queue.claim(
            sessions=self.sessions,
            owner=self.owner,
            lease_s=self.lease_s,
            max_attempts=self.max_attempts,
        )
        if job is None:
            return False
        self.process(job)
        return True

    def process(self, job: IngestJob) -> None:
        lost = threading.Event()
        done = threading.Event()

        def keep_lease() -> None:
            while not done.wait(self.lease_s / 3):
                if not queue.renew(
                    sessions=self.sessions, job_id=job.id, owner=self.owner, lease_s=self.lease_s
                ):
                    lost.set()
                    return

        renewer = threading.Thread(target=keep_lease, name=f"lease-{job.id}", daemon=True)
        renewer.start()
        status = "done"
        try:
            self._handle(job)
        except ParseError as exc:
            status = self._record_failure(job, str(exc), permanent=exc.permanent)
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            status = self._record_failure(job, reason, permanent=False)
        else:
            with self.sessions() as session, session.begin():
                if not queue.complete(session=session, job_id=job.id, owner=self.owner):
                    logger.warning("job %s finished after its lease was lost", job.id)
        finally:
            done.set()
            renewer.join()
        if lost.is_set():
            logger.warning("lease on job %s was lost while working", job.id)
        if self.on_job_done is not None:
            self.on_job_done(job, status)

    def _record_failure(self, job: IngestJob, error: str, *, permanent: bool) -> str:
        with self.sessions() as session, session.begin():
            return queue.fail(
                session=session,
                job=job,
                owner=self.owner,
                error=error,
                permanent=permanent,
                max_attempts=self.max_attempts,
                backoff_s=self.backoff_s,
            )

    def _handle(self, job: IngestJob) -> None:
        if job.kind == JobKind.INGEST:
            if job.document_id is None:
                raise ParseError("ingest job without a document")
            count = self.pipeline.process_document(job.document_id)
            logger.info("document %s ready: %d chunks", job.document_id, count)
        elif job.kind == JobKind.REINDEX:
            if job.params.get("reparse"):
                self.pipeline.reparse_all()
            count = self.pipeline.rebuild_index()
            logger.info("reindex done: %d vectors", count)
        else:
            raise ParseError(f"unknown job kind {job.kind!r}")
