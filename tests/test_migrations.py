import pytest
from sqlalchemy import inspect

from ingest.db import downgrade, make_engine, migrate

TABLES = {"documents", "chunks", "ingest_jobs", "index_state"}


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _check_up_down_up(engine) -> None:
    migrate(engine)
    assert _tables(engine) == TABLES
    cols = {c["name"] for c in inspect(engine).get_columns("chunks")}
    assert {"char_start", "char_end", "heading_path", "page", "token_count"} <= cols
    job_cols = {c["name"] for c in inspect(engine).get_columns("ingest_jobs")}
    assert {"lease_owner", "lease_expires_at", "attempts", "kind"} <= job_cols
    migrate(engine)  # idempotent
    downgrade(engine)
    assert _tables(engine) == set()
    migrate(engine)
    assert _tables(engine) == TABLES


def test_migrations_run_up_and_down_on_sqlite(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    _check_up_down_up(engine)


@pytest.mark.postgres
def test_migrations_run_up_and_down_on_postgresql(postgres_url):
    engine = make_engine(postgres_url)
    try:
        _check_up_down_up(engine)
    finally:
        engine.dispose()
