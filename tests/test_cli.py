"""The `ragqa` command line as a user runs it (subprocesses, real files)."""

import os
import subprocess
import sys

import pytest

from tests import docs
from tests.conftest import MODEL_DIR


def ragqa(tmp_path, *args, extra_env=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQA_")}
    env.update(
        RAGQA_DATA_DIR=str(tmp_path / "data"),
        RAGQA_MODEL_DIR=str(MODEL_DIR),
        RAGQA_GENERATOR="smollm2-135m-instruct",
        RAGQA_LOG_LEVEL="WARNING",
        **(extra_env or {}),
    )
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def test_serve_refuses_public_bind_without_keys(tmp_path):
    out = ragqa(tmp_path, "serve", "--host", "0.0.0.0", "--port", "8999")
    assert out.returncode == 2
    assert "RAGQA_ALLOW_INSECURE=1" in out.stderr


def test_models_list_shows_presets_and_their_state(tmp_path):
    out = ragqa(tmp_path, "models", "list")
    assert out.returncode == 0, out.stderr
    for name in ("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct", "all-minilm-l6-v2"):
        assert name in out.stdout


def test_models_pull_unknown_name_fails_with_presets_listed(tmp_path):
    out = ragqa(tmp_path, "models", "pull", "no-such-model")
    assert out.returncode == 1 and "presets are" in out.stderr


@pytest.mark.slow
def test_ingest_folder_then_verify_then_ask_prints_answer_and_sources(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "engine.pdf").write_bytes(
        docs.pdf_bytes(["Contents.", "The Zorblax engine runs on liquid nitrogen."])
    )
    (folder / "sub" / "bees.html").write_bytes(
        docs.html_bytes("Bees", "Bees", "Honey bees dance to show where flowers are.")
    )
    (folder / "sub" / "locked.pdf").write_bytes(docs.encrypted_pdf_bytes())
    out = ragqa(tmp_path, "ingest", str(folder))
    assert out.returncode == 1  # one file failed, and the table says why
    assert "encrypted PDF: remove the password" in out.stdout
    assert "2 ready" in out.stdout and "1 failed" in out.stdout
    again = ragqa(tmp_path, "ingest", str(folder / "engine.pdf"))
    assert "duplicate" in again.stdout
    verify = ragqa(tmp_path, "reindex", "--verify")
    assert verify.returncode == 0 and "ok: database and index agree" in verify.stdout
    rebuilt = ragqa(tmp_path, "reindex")
    assert rebuilt.returncode == 0 and "index rebuilt" in rebuilt.stdout
    reparsed = ragqa(tmp_path, "reindex", "--reparse")
    assert reparsed.returncode == 0, reparsed.stderr
    assert ragqa(tmp_path, "reindex", "--verify").returncode == 0
    listing = ragqa(tmp_path, "ingest", str(folder))  # all three are known by now
    assert "3 duplicate" in listing.stdout
    answer = ragqa(tmp_path, "ask", "Who won the chess world championship in 1972?")
    assert answer.returncode == 0, answer.stderr
    assert "The documents do not contain an answer to this question." in answer.stdout


@pytest.mark.slow
def test_reindex_with_another_embedder_builds_a_new_index_that_verifies(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(
        "大熊猫每天要吃大约十二公斤的竹子。\n\nPandas eat bamboo every day."
    )
    assert ragqa(tmp_path, "ingest", str(folder)).returncode == 0
    out = ragqa(tmp_path, "reindex", "--embedder", "use-multilingual-v3")
    assert out.returncode == 0, out.stderr
    assert "RAGQA_EMBEDDER=use-multilingual-v3" in out.stdout
    assert (tmp_path / "data" / "index" / "use-multilingual-v3" / "index.faiss").exists()
    # the old index stays where it was, serving until the restart
    assert (tmp_path / "data" / "index" / "all-minilm-l6-v2" / "index.faiss").exists()
    verify = ragqa(
        tmp_path, "reindex", "--verify", extra_env={"RAGQA_EMBEDDER": "use-multilingual-v3"}
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
