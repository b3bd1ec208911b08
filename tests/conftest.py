"""Shared fixtures: temp data dirs, a real uvicorn server, PostgreSQL when one answers."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from sqlalchemy import create_engine, text

from app.main import create_app
from app.settings import Settings

PG_URL = os.environ.get(
    "RAGQA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MODEL_DIR = Path(os.environ.get("RAGQA_TEST_MODEL_DIR", "~/.cache/ragqa/models")).expanduser()


# The shape of the tests' random-weight decoder models (grouped-query attention).
TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def tiny_llama(tokenizer: Any) -> Any:
    """A random-weight 2-layer Llama (seed 0, fp32, eval mode) for a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **TINY_SIZES
    )
    return LlamaForCausalLM(config).eval()


def smaps_entry(address: int, key: str) -> list[str]:
    """The fields of `key` ("Rss:", "VmFlags:") in /proc/self/smaps for the mapping of
    this process that holds `address`."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == key:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings isolated from the developer's environment and .env, rooted in tmp_path."""
    for key in list(os.environ):
        if key.startswith("RAGQA_") and not key.startswith("RAGQA_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "data_dir": tmp_path / "data",
            "model_dir": MODEL_DIR,
            "generator": "smollm2-135m-instruct",
            "load_generator": False,  # tests that answer questions turn it on
        }
        values.update(overrides)
        return Settings(**values)

    return make


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def services(self):
        return self.app.state.services


@pytest.fixture
def live_server(settings_factory):
    """Start a real HTTP server: `with live_server(api_keys=...) as srv: ...`."""

    def start(**overrides: object) -> LiveServer:
        return LiveServer(settings_factory(**overrides))

    return start


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema on the real PostgreSQL server; skips (saying why) when none answers."""
    try:
        admin = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # no server, no driver, refused: the test cannot run here
        pytest.skip(f"no PostgreSQL server answers at {PG_URL}: {exc.__class__.__name__}")
    schema = f"ragqa_test_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def wait_for(predicate, *, timeout: float = 120.0, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
