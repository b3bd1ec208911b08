"""Job claiming is exclusive under concurrency, and expired leases are taken over."""

import threading
import time

import pytest
from sqlalchemy import select

from ingest import queue
from ingest.db import make_engine, make_session_factory, migrate
from ingest.schema import IngestJob, JobStatus


def _setup(url):
    engine = make_engine(url)
    migrate(engine)
    return engine, make_session_factory(engine)


def _claim_all_concurrently(sessions, n_jobs, n_workers=6):
    with sessions() as s, s.begin():
        for _ in range(n_jobs):
            queue.enqueue(session=s)
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name):
        while True:
            job = queue.claim(sessions=sessions, owner=name, lease_s=60, max_attempts=3)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return claimed


def _check_exclusive(url):
    engine, sessions = _setup(url)
    try:
        claimed = _claim_all_concurrently(sessions, 60)
        assert sorted(claimed) == sorted(set(claimed)), "a job was claimed twice"
        assert len(claimed) == 60
    finally:
        engine.dispose()


def _check_expired_lease_is_taken_over(url):
    engine, sessions = _setup(url)
    try:
        with sessions() as s, s.begin():
            queue.enqueue(session=s)
        first = queue.claim(sessions=sessions, owner="dead", lease_s=0.2, max_attempts=3)
        assert first is not None
        assert queue.claim(sessions=sessions, owner="other", lease_s=60, max_attempts=3) is None
        time.sleep(0.3)
        second = queue.claim(sessions=sessions, owner="alive", lease_s=60, max_attempts=3)
        assert second is not None and second.id == first.id and second.attempts == 2
        assert not queue.renew(sessions=sessions, job_id=first.id, owner="dead", lease_s=60)
        assert queue.renew(sessions=sessions, job_id=first.id, owner="alive", lease_s=60)
    finally:
        engine.dispose()


def test_sqlite_claims_are_exclusive_across_threads(tmp_path):
    _check_exclusive(f"sqlite:///{tmp_path / 'q.db'}")


def test_sqlite_expired_lease_is_taken_by_another_worker(tmp_path):
    _check_expired_lease_is_taken_over(f"sqlite:///{tmp_path / 'q.db'}")


@pytest.mark.postgres
def test_postgres_skip_locked_claims_are_exclusive(postgres_url):
    _check_exclusive(postgres_url)


@pytest.mark.postgres
def test_postgres_expired_lease_is_taken_by_another_worker(postgres_url):
    _check_expired_lease_is_taken_over(postgres_url)


def test_failure_retries_with_backoff_then_fails_for_good(tmp_path):
    _, sessions = _setup(f"sqlite:///{tmp_path / 'q.db'}")
    with sessions() as s, s.begin():
        queue.enqueue(session=s)
    statuses = []
    for _ in range(3):
        job = None
        deadline = time.monotonic() + 10
        while job is None and time.monotonic() < deadline:
            job = queue.claim(sessions=sessions, owner="w", lease_s=60, max_attempts=3)
            time.sleep(0.01)
        assert job is not None
        with sessions() as s, s.begin():
            statuses.append(
                queue.fail(
                    session=s,
                    job=job,
                    owner="w",
                    error="boom",
                    permanent=False,
                    max_attempts=3,
                    backoff_s=0.05,
                )
            )
    assert statuses == [JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.FAILED]
    with sessions() as s:
        job = s.execute(select(IngestJob)).scalar_one()
        assert job.error == "boom" and job.attempts == 3


def test_job_whose_worker_keeps_dying_fails_after_max_attempts(tmp_path):
    _, sessions = _setup(f"sqlite:///{tmp_path / 'q.db'}")
    with sessions() as s, s.begin():
        queue.enqueue(session=s)
    for _ in range(2):
        assert queue.claim(sessions=sessions, owner="x", lease_s=0.05, max_attempts=2)
        time.sleep(0.1)
    assert queue.claim(sessions=sessions, owner="x", lease_s=0.05, max_attempts=2) is None
    with sessions() as s, s.begin():
        assert queue.fail_exhausted(session=s, max_attempts=2) == 1
    with sessions() as s:
        job = s.execute(select(IngestJob)).scalar_one()
        assert job.status == JobStatus.FAILED and "stopped 2 times" in job.error
