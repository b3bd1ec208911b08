"""The job queue in the database: enqueue, claim with a lease, renew, finish, retry with backoff.

Claiming is atomic on both backends: PostgreSQL uses `FOR UPDATE SKIP LOCKED` so many
workers never wait on each other; SQLite runs one `UPDATE … WHERE id = (SELECT …)
RETURNING`, which SQLite executes under its single write lock. A job whose lease expired
(its worker died) is claimable again; every claim counts as an attempt, so a document
that kills its worker fails after `max_attempts` instead of looping forever.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ingest.schema import Document, DocumentStatus, IngestJob, JobKind, JobStatus, utcnow


def enqueue(
    *,
    session: Session,
    kind: str = JobKind.INGEST,
    document_id: int | None = None,
    params: dict[str, Any] | None = None,
) -> IngestJob:
    job = IngestJob(
        kind=kind,
        document_id=document_id,
        status=JobStatus.QUEUED,
        attempts=0,
        params=params or {},
        available_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def _claimable(now: dt.datetime, max_attempts: int) -> Any:
    return or_(
        and_(IngestJob.status == JobStatus.QUEUED, IngestJob.available_at <= now),
        and_(
            IngestJob.status == JobStatus.RUNNING,
            IngestJob.lease_expires_at < now,
            IngestJob.attempts < max_attempts,
        ),
    )


def claim(
    *,
    sessions: sessionmaker[Session],
    owner: str,
    lease_s: float,
    max_attempts: int,
    kinds: tuple[str, ...] = (),
) -> IngestJob | None:
    """Take the oldest claimable job for `owner`, or None when there is none."""
    now = utcnow()
    values = {
        "status": JobStatus.RUNNING,
        "lease_owner": owner,
        "lease_expires_at": now + dt.timedelta(seconds=lease_s),
        "attempts": IngestJob.attempts + 1,
        "started_at": now,
        "updated_at": now,
    }
    cond = _claimable(now, max_attempts)
    if kinds:
        cond = and_(cond, IngestJob.kind.in_(kinds))
    with sessions() as session, session.begin():
        if session.get_bind().dialect.name == "postgresql":
            job_id = session.execute(
                select(IngestJob.id)
                .where(cond)
                .order_by(IngestJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if job_id is None:
                return None
            session.execute(update(IngestJob).where(IngestJob.id == job_id).values(**values))
        else:
            pick = select(IngestJob.id).where(cond).order_by(IngestJob.id).limit(1)
            job_id = session.execute(
                update(IngestJob)
                .where(IngestJob.id == pick.scalar_subquery(), cond)
                .values(**values)
                .returning(IngestJob.id)
            ).scalar_one_or_none()
            if job_id is None:
                return None
        job = session.get(IngestJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def renew(*, sessions: sessionmaker[Session], job_id: int, owner: str, lease_s: float) -> bool:
    """Extend the lease; False when the job is no longer ours (expired and re-claimed)."""
    now = utcnow()
    with sessions() as session, session.begin():
        result = session.execute(
            update(IngestJob)
            .where(
                IngestJob.id == job_id,
                IngestJob.lease_owner == owner,
                IngestJob.status == JobStatus.RUNNING,
            )
            .values(lease_expires_at=now + dt.timedelta(seconds=lease_s), updated_at=now)
        )
        return result.rowcount == 1


def complete(*, session: Session, job_id: int, owner: str) -> bool:
    now = utcnow()
    result = session.execute(
        update(IngestJob)
        .where(IngestJob.id == job_id, IngestJob.lease_owner == owner)
        .values(
            status=JobStatus.DONE,
            error=None,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
    )
    return result.rowcount == 1


def fail(
    *,
    session: Session,
    job: IngestJob,
    owner: str,
    error: str,
    permanent: bool,
    max_attempts: int,
    backoff_s: float = 2.0,
) -> str:
    """Record a failure: retry later (backoff doubles per attempt) or fail for good.

    Returns the job's new status. The document of a job that failed for good is marked
    failed with the same error.
    """
    now = utcnow()
    final = permanent or job.attempts >= max_attempts
    status = JobStatus.FAILED if final else JobStatus.QUEUED
    delay = backoff_s * (2 ** max(0, job.attempts - 1))
    session.execute(
        update(IngestJob)
        .where(IngestJob.id == job.id, IngestJob.lease_owner == owner)
        .values(
            status=status,
            error=error,
            lease_owner=None,
            lease_expires_at=None,
            available_at=now + dt.timedelta(seconds=delay),
            finished_at=now if final else None,
            updated_at=now,
        )
    )
    if job.document_id is not None:
        doc_status = DocumentStatus.FAILED if final else DocumentStatus.QUEUED
        session.execute(
            update(Document)
            .where(Document.id == job.document_id)
            .values(status=doc_status, error=error, updated_at=now)
        )
    return status


def fail_exhausted(*, session: Session, max_attempts: int) -> int:
    """Fail jobs whose worker died `max_attempts` times (their lease expired once more)."""
    now = utcnow()
    rows = session.execute(
        select(IngestJob).where(
            IngestJob.status == JobStatus.RUNNING,
            IngestJob.lease_expires_at < now,
            IngestJob.attempts >= max_attempts,
        )
    ).scalars()
    count = 0
    for job in rows:
        error = f"worker stopped {job.attempts} times while processing this job"
        job.status, job.error, job.finished_at = JobStatus.FAILED, error, now
        job.lease_owner, job.lease_expires_at = None, None
        if job.document_id is not None:
            doc = session.get(Document, job.document_id)
            if doc is not None:
                doc.status, doc.error = DocumentStatus.FAILED, error
        count += 1
    return count
