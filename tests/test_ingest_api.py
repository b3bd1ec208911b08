"""The write side through a real HTTP server: upload, parse, chunk, embed, index, delete."""

import httpx
import pytest

from tests import docs
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from app.settings import Settings
    from tests.conftest import MODEL_DIR, LiveServer

    root = tmp_path_factory.mktemp("ingest")
    settings = Settings(
        data_dir=root / "data",
        model_dir=MODEL_DIR,
        generator="smollm2-135m-instruct",
        max_upload_mb=1,
        api_keys="",
    )
    with LiveServer(settings) as srv:
        yield srv


def upload(server, name, data, **form):
    return httpx.post(
        f"{server.url}/v1/documents", files={"file": (name, data)}, data=form, timeout=60
    )


def wait_final(server, doc_id):
    def final():
        body = httpx.get(f"{server.url}/v1/documents/{doc_id}").json()
        return body if body["status"] in ("ready", "failed") else None

    return wait_for(final, what=f"document {doc_id} to finish")


def test_pdf_upload_becomes_ready_with_page_numbers_and_exact_spans(server):
    data = docs.pdf_bytes(
        ["Apples grow on trees in orchards.", "Pears ripen after they are picked."],
        title="Fruit facts",
    )
    r = upload(server, "fruit.pdf", data, collection="fruit", metadata='{"source": "test"}')
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "queued" and body["job_id"] and body["collection"] == "fruit"
    assert body["mime"] == "application/pdf" and body["metadata"] == {"source": "test"}
    doc = wait_final(server, body["id"])
    assert doc["status"] == "ready", doc["error"]
    assert doc["page_count"] == 2 and doc["chunk_count"] >= 1 and doc["title"] == "Fruit facts"
    assert {"parse_s", "chunk_s", "embed_s"} <= doc["timings"].keys()
    chunks = httpx.get(f"{server.url}/v1/documents/{body['id']}/chunks").json()["items"]
    text = server.services.extras["store"].get_text(body["id"])
    pear = next(c for c in chunks if "Pears" in c["text"])
    assert pear["page"] == 2
    for c in chunks:
        assert text[c["char_start"] : c["char_end"]] == c["text"]
    job = httpx.get(f"{server.url}/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "done" and job["attempts"] == 1


def test_vectors_of_a_ready_document_are_searchable(server):
    data = docs.docx_bytes([("Volcanoes", ["Magma rises through the crust and erupts as lava."])])
    doc_id = upload(server, "geo.docx", data).json()["id"]
    assert wait_final(server, doc_id)["status"] == "ready"
    services = server.services
    query = services.extras["embedder"].embed(["How does lava come out of a volcano?"])
    _, ids = services.extras["index"].search(query, 3)
    chunk_ids = {
        c["id"] for c in httpx.get(f"{server.url}/v1/documents/{doc_id}/chunks").json()["items"]
    }
    assert int(ids[0][0]) in chunk_ids


def test_same_bytes_in_same_collection_returns_existing_document(server):
    data = docs.html_bytes("Dup", "Duplicate", "Same bytes twice.")
    first = upload(server, "a.html", data)
    second = upload(server, "b.html", data)
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["duplicate"] is True and second.json()["id"] == first.json()["id"]
    other = upload(server, "a.html", data, collection="other")
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_utf16_text_is_decoded(server):
    text = "Der Fluss führt Hochwasser. Überschwemmungen drohen im Tal."
    doc_id = upload(server, "note.txt", text.encode("utf-16")).json()["id"]
    assert wait_final(server, doc_id)["status"] == "ready"
    chunks = httpx.get(f"{server.url}/v1/documents/{doc_id}/chunks").json()["items"]
    assert chunks[0]["text"] == text


def test_encrypted_pdf_ends_failed_with_reason(server):
    doc_id = upload(server, "locked.pdf", docs.encrypted_pdf_bytes()).json()["id"]
    doc = wait_final(server, doc_id)
    assert doc["status"] == "failed"
    assert doc["error"] == "encrypted PDF: remove the password and upload again"
    assert doc["chunk_count"] == 0


def test_empty_file_returns_422(server):
    r = upload(server, "empty.txt", b"")
    assert r.status_code == 422 and "empty" in r.json()["detail"]


def test_upload_over_limit_returns_413(server):
    r = upload(server, "big.txt", b"a" * (3 * 1024 * 1024))
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_unsupported_type_returns_415_listing_types(server):
    r = upload(server, "blob.bin", bytes(range(256)) * 16)
    assert r.status_code == 415
    assert "PDF, DOCX" in r.json()["detail"]


def test_bad_metadata_and_missing_file_return_422(server):
    r = upload(server, "x.txt", b"hello there", metadata="[1, 2]")
    assert r.status_code == 422 and "JSON object" in r.json()["detail"]
    r = httpx.post(f"{server.url}/v1/documents", data={"collection": "x"})
    assert r.status_code == 422


def test_unknown_ids_return_404(server):
    assert httpx.get(f"{server.url}/v1/documents/999999").status_code == 404
    assert httpx.get(f"{server.url}/v1/documents/999999/chunks").status_code == 404
    assert httpx.delete(f"{server.url}/v1/documents/999999").status_code == 404
    assert httpx.get(f"{server.url}/v1/jobs/999999").status_code == 404


def test_delete_removes_chunks_and_vectors(server):
    data = docs.html_bytes("Del", "Delete me", "This document will be deleted soon.")
    doc_id = upload(server, "del.html", data).json()["id"]
    assert wait_final(server, doc_id)["status"] == "ready"
    ids = [c["id"] for c in httpx.get(f"{server.url}/v1/documents/{doc_id}/chunks").json()["items"]]
    index = server.services.extras["index"]
    assert set(ids) <= set(index.ids().tolist())
    assert httpx.delete(f"{server.url}/v1/documents/{doc_id}").status_code == 204
    assert httpx.get(f"{server.url}/v1/documents/{doc_id}").status_code == 404
    assert not set(ids) & set(index.ids().tolist())


def test_list_filters_by_collection_and_status(server):
    upload(server, "c.txt", b"Collection filter test text.", collection="filtered")
    body = httpx.get(f"{server.url}/v1/documents", params={"collection": "filtered"}).json()
    assert body["total"] == 1 and body["items"][0]["collection"] == "filtered"
    bad = httpx.get(f"{server.url}/v1/documents", params={"status": "weird"})
    assert bad.status_code == 422


def test_admin_reindex_job_rebuilds_index_and_verify_is_clean(server):
    r = httpx.post(f"{server.url}/v1/admin/reindex")
    assert r.status_code == 202
    job_id = r.json()["id"]
    job = wait_for(
        lambda: (j := httpx.get(f"{server.url}/v1/jobs/{job_id}").json())["status"] == "done" and j,
        what="reindex job",
    )
    assert job["kind"] == "reindex"
    report = server.services.extras["pipeline"].verify()
    assert report.ok, report
