import httpx
import pytest


@pytest.fixture
def keyed_server(live_server):
    with live_server(api_keys="user-key-1,admin:admin-key-1") as srv:
        yield srv


def test_healthz_needs_no_key_and_reports_components(keyed_server):
    r = httpx.get(f"{keyed_server.url}/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"]["state"] == "ready"
    assert {"index", "generator", "embedder"} <= body.keys()


def test_v1_route_without_key_returns_401(keyed_server):
    r = httpx.get(f"{keyed_server.url}/v1/documents")
    assert r.status_code == 401
    assert "Authorization: Bearer" in r.json()["detail"]


def test_v1_route_with_wrong_key_returns_401(keyed_server):
    r = httpx.get(f"{keyed_server.url}/v1/documents", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert r.json()["detail"] == "invalid API key"


def test_v1_route_with_user_key_is_allowed(keyed_server):
    r = httpx.get(
        f"{keyed_server.url}/v1/documents", headers={"Authorization": "Bearer user-key-1"}
    )
    assert r.status_code == 200


def test_admin_route_with_user_key_returns_403(keyed_server):
    r = httpx.post(
        f"{keyed_server.url}/v1/admin/reindex", headers={"Authorization": "Bearer user-key-1"}
    )
    assert r.status_code == 403
    assert "admin key" in r.json()["detail"]


def test_admin_route_with_admin_key_is_allowed(keyed_server):
    r = httpx.post(
        f"{keyed_server.url}/v1/admin/reindex", headers={"Authorization": "Bearer admin-key-1"}
    )
    assert r.status_code == 202


def test_without_keys_v1_routes_are_open_on_loopback(live_server):
    with live_server() as srv:
        r = httpx.get(f"{srv.url}/v1/documents")
        assert r.status_code == 200


def test_openapi_docs_are_served(live_server):
    with live_server() as srv:
        assert httpx.get(f"{srv.url}/docs").status_code == 200
        assert "/v1/documents" in httpx.get(f"{srv.url}/openapi.json").json()["paths"]


def test_ask_without_a_loaded_generator_returns_503_with_the_reason(live_server):
    with live_server(load_generator=False) as srv:
        r = httpx.post(f"{srv.url}/v1/ask", json={"question": "anything?"})
        assert r.status_code == 503
        assert (
            "is not loaded" in r.json()["detail"] and "RAGQA_LOAD_GENERATOR" in r.json()["detail"]
        )
        health = httpx.get(f"{srv.url}/healthz").json()
        assert health["generator"]["state"] == "disabled"
