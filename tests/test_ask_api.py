"""The answer API end to end through a real HTTP server with the smallest packaged generator.

SmolLM2-135M writes poor answers; these tests check what the service guarantees whatever
the model writes: citations point at passages that were given (right document and page),
weak evidence is refused with the fixed message, streaming formats, OpenAI compatibility.
"""

import json

import httpx
import pytest
import torch

from app.settings import Settings
from generation import qmatmul
from generation.device import choose_dtype, cpu_has_amx
from generation.quant_load import integer_prefill_pays
from tests import docs
from tests.conftest import MODEL_DIR, LiveServer, wait_for

REFUSAL_EN = "The documents do not contain an answer to this question."
REFUSAL_ZH = "根据现有资料无法回答该问题。"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask")
    settings = Settings(
        data_dir=root / "data",
        model_dir=MODEL_DIR,
        generator="smollm2-135m-instruct",
        max_question_chars=500,
        max_answer_tokens=48,
        # SmolLM2-135M's yes/no judgement is noise; switch the gate off here so that the
        # generation path runs. The gate has its own test below.
        answerable_threshold=0.0,
    )
    with LiveServer(settings) as srv:
        wait_for(
            lambda: (
                httpx.get(f"{srv.url}/healthz").json()["generator"]["state"] in ("ready", "error")
            ),
            what="generator to load",
        )
        assert httpx.get(f"{srv.url}/healthz").json()["generator"]["state"] == "ready"
        pdf = docs.pdf_bytes(
            [
                "Contents: safety notes, maintenance schedule, warranty terms.",
                "The Zorblax engine runs on liquid nitrogen and was built in 1987 in Oslo.",
            ],
            title="Zorblax manual",
        )
        zh = (
            "熊猫是中国特有的动物，主要生活在四川的山区。\n\n大熊猫每天要吃大约十二公斤的竹子。"
        ).encode("gb18030")
        ids = []
        for name, data, coll in [("zorblax.pdf", pdf, "manuals"), ("panda.txt", zh, "animals")]:
            r = httpx.post(
                f"{srv.url}/v1/documents", files={"file": (name, data)}, data={"collection": coll}
            )
            ids.append(r.json()["id"])
        for doc_id in ids:
            wait_for(
                lambda d=doc_id: (
                    httpx.get(f"{srv.url}/v1/documents/{d}").json()["status"] == "ready"
                ),
                what="document ready",
            )
        srv.doc_ids = ids
        yield srv


def ask(server, **body):
    return httpx.post(f"{server.url}/v1/ask", json=body, timeout=120)


def test_default_service_decodes_with_its_ggufs_packs_where_the_kernels_build(server):
    # The fixture leaves RAGQA_QUANTIZATION at its default (auto); the preset's GGUF lies
    # beside its folder in the model cache.
    assert server.settings.quantization == "auto"
    detail = httpx.get(f"{server.url}/healthz").json()["generator"]["detail"]
    expected = "gguf" if qmatmul.load() else "none"
    # auto prefills gguf packs on the integer GEMM where the float GEMMs would be float32
    # or bfloat16 without AMX, else (AMX) from float copies; gguf keeps one dtype throughout
    integer = qmatmul.load() and integer_prefill_pays(
        "gguf", choose_dtype(torch.device("cpu")), on_kernels=True, amx=cpu_has_amx()
    )
    prefill = "integer" if integer else "float"
    assert f"quantization {expected}, prefill from {prefill} weights in " in detail, detail


def test_citations_point_to_the_right_document_and_page(server):
    r = ask(server, question="What does the Zorblax engine run on?", debug=True)
    assert r.status_code == 200
    body = r.json()
    assert {"answer", "refused", "citations", "usage", "timings"} <= body.keys()
    assert body["usage"]["prompt_tokens"] > 0
    assert {"retrieve_ms", "ttft_ms", "total_ms"} <= body["timings"].keys()
    top = body["retrieved"][0]
    assert top["document_id"] == server.doc_ids[0] and top["page"] == 2
    # debug also shows the searched question and the dense evidence over HTTP
    assert body["query"] == "What does the Zorblax engine run on?"
    assert 0.3 <= body["max_dense"] <= 1.0
    if body["refused"]:
        assert body["answer"] == REFUSAL_EN and body["citations"] == []
    if body["citations"]:
        assert body["raw_answer"]  # the model's text before the service checked its markers
    for c in body["citations"]:
        # every citation names a passage that was retrieved and given
        assert c["chunk_id"] in {p["chunk_id"] for p in body["retrieved"]}
        assert c["document_id"] == server.doc_ids[0] and c["page"] == 2
        assert "liquid nitrogen" in c["text"]
        assert c["filename"] == "zorblax.pdf" and c["title"] == "Zorblax manual"


def test_question_about_absent_topic_is_refused_with_fixed_message(server):
    r = ask(server, question="Who won the 1954 football world cup final in Bern?")
    assert r.status_code == 200
    body = r.json()
    assert body["refused"] is True
    assert body["answer"] == REFUSAL_EN and body["citations"] == []


def test_chinese_absent_question_is_refused_in_chinese(server):
    r = ask(server, question="量子计算机的工作原理是什么？")
    body = r.json()
    assert body["refused"] is True and body["answer"] == REFUSAL_ZH


def test_chinese_question_retrieves_the_chinese_document(server):
    r = ask(server, question="大熊猫每天吃多少竹子？", debug=True)
    body = r.json()
    assert body["retrieved"][0]["document_id"] == server.doc_ids[1]
    for c in body["citations"]:
        assert c["document_id"] == server.doc_ids[1]


def test_stream_sends_deltas_then_citations_then_done(server):
    with httpx.stream(
        "POST",
        f"{server.url}/v1/ask",
        json={"question": "When was the Zorblax engine built?", "stream": True},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = []
        for block in r.read().decode().split("\n\n"):
            if block.strip():
                lines = dict(line.split(": ", 1) for line in block.splitlines())
                events.append((lines["event"], json.loads(lines["data"])))
    kinds = [k for k, _ in events]
    assert kinds[-2:] == ["citations", "done"] and set(kinds[:-2]) == {"delta"}
    streamed = "".join(d["text"] for k, d in events if k == "delta")
    citations = events[-2][1]
    if not citations["refused"]:
        assert streamed.strip() == citations["answer"]
    assert events[-1][1]["usage"]["completion_tokens"] >= 0


def test_ask_errors_are_clear(server):
    r = ask(server, question="   ")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = ask(server, question="x" * 501)
    assert r.status_code == 422 and "at most 500 characters" in r.json()["detail"]
    r = ask(server, question="hello?", collection="no-such-collection")
    assert r.status_code == 404 and "no-such-collection" in r.json()["detail"]
    r = ask(server, question="hello?", temperature=9)
    assert r.status_code == 422


def test_collection_filter_keeps_other_collections_out(server):
    r = ask(
        server, question="What does the Zorblax engine run on?", collection="animals", debug=True
    )
    body = r.json()
    assert all(p["document_id"] == server.doc_ids[1] for p in body["retrieved"])


def test_openai_sdk_chat_completion_with_citations(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert client.models.list().data[0].id == "smollm2-135m-instruct"
    out = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What does the Zorblax engine run on?"}],
        max_tokens=40,
    )
    assert out.choices[0].message.role == "assistant"
    extra = out.model_extra
    assert "citations" in extra and isinstance(extra["citations"], list)
    assert out.usage.prompt_tokens > 0


def test_openai_sdk_streaming_ends_with_done(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[
            {"role": "user", "content": "Tell me about the Zorblax engine."},
            {"role": "assistant", "content": "It is an engine."},
            {"role": "user", "content": "Where was it built?"},
        ],
        max_tokens=40,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "citations" in chunks[-1].model_extra
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text


def _strict_answerer(server):
    """The server's parts with an answerability gate no answer can pass."""
    from app.answer import Answerer

    services = server.services
    return Answerer(
        retriever=services.extras["retriever"],
        engine=services.extras["engine"],
        scheduler=services.extras["scheduler"],
        refusal_threshold=0.3,
        answerable_threshold=0.9999,
    )


def test_answerability_gate_refuses_when_the_model_doubts_the_passages(server):
    import asyncio

    from app.answer import AskInput

    question = "What does the Zorblax engine run on?"
    out = asyncio.run(_strict_answerer(server).answer(AskInput(question=question, debug=True)))
    assert out["refused"] is True and out["refusal_reason"] == "not_answerable"
    assert 0.0 <= out["answerable_p"] < 0.9999
    assert "liquid nitrogen" in out["evidence"]  # the check was asked about the right sentence
    assert out["answer"] == REFUSAL_EN and out["citations"] == []


def test_answerability_gate_leaves_chinese_questions_to_the_model(server):
    import asyncio

    from app.answer import AskInput

    question = "大熊猫每天吃多少竹子？"
    out = asyncio.run(_strict_answerer(server).answer(AskInput(question=question, debug=True)))
    # The threshold was set on English data only: no check runs for a Chinese question.
    assert "answerable_p" not in out
    assert out.get("refusal_reason") != "not_answerable"
