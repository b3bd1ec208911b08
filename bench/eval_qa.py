"""Answer quality through the real /v1/ask path: accuracy, refusals, citations, latency. JSON out.

Usage: python bench/eval_qa.py DIR [--limit N] [--seed S] [--generator NAME] [--out FILE]
                              [--url http://host:port] [--embedder NAME] [--top-k K]
                              [--concurrency N] [--quantization MODE] [--baseline FILE]

DIR holds questions.jsonl and docs.jsonl (schema in shared/eval/README.md). The docs are
ingested into a temporary data dir and every question is asked in-process through the
same answer pipeline the API uses (or over HTTP with --url, against an already loaded
server). Prints JSON, then a markdown table on stderr.

--baseline FILE compares with an earlier run's --out JSON over the same questions: how many
raw answers are identical (the quantization issue's "greedy output identical" measure) and
the accuracy difference. Run both with --concurrency 1: batched decode steps sum in a
different order from single ones, so two unquantized runs at --concurrency 4 can differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select
from stats import percentile  # bench/stats.py, beside this script

from app.answer import Answerer, AskInput
from app.commands import ingest_items
from app.generator import load_generator
from app.main import build_services
from app.settings import Settings
from app.wiring import answerable_threshold, build_answerer, build_ingest, build_retriever
from generation.params import GenerationParams
from generation.quant import SETTING_MODES
from ingest.schema import Document


def normalise(text: str) -> str:
    """Lower-case, drop punctuation and whitespace (the shared scoring convention)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not (unicodedata.category(ch)[0] in "PZS" or ch.isspace()))


def is_correct(answer: str, gold: list[str], match: str) -> bool:
    norm = normalise(answer)
    parts = [normalise(g) for g in gold if normalise(g)]
    if not parts:
        return False
    return all(p in norm for p in parts) if match == "all" else any(p in norm for p in parts)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def pick(questions: list[dict], limit: int, seed: int) -> list[dict]:
    if not limit or limit >= len(questions):
        return questions
    rng = random.Random(seed)
    return sorted(rng.sample(questions, limit), key=lambda q: questions.index(q))


def ingest_docs(settings: Settings, docs: list[dict]) -> tuple[Any, Any, dict[int, str]]:
    services = build_services(settings)
    parts = build_ingest(settings, services.sessions)
    items = (
        (
            Path(f"{d['doc_id']}.txt"),
            f"{d['doc_id']}.txt",
            d["text"].encode("utf-8"),
            {"source_id": d["doc_id"], "title": d.get("title") or ""},
        )
        for d in docs
    )
    ingest_items(settings, items, services=services, parts=parts)
    with services.sessions() as session:
        rows = session.execute(select(Document.id, Document.meta)).all()
    return services, parts, {doc_id: (meta or {}).get("source_id") for doc_id, meta in rows}


async def ask_in_process(answerer: Answerer, question: str, top_k: int, max_tokens: int) -> dict:
    inp = AskInput(
        question=question,
        top_k=top_k,
        params=GenerationParams(max_new_tokens=max_tokens),
        debug=True,
    )
    start = time.perf_counter()
    out = await answerer.answer(inp)
    out["_wall_s"] = time.perf_counter() - start
    return out


def ask_http(url: str, question: str, top_k: int, max_tokens: int) -> dict:
    import httpx

    start = time.perf_counter()
    r = httpx.post(
        f"{url}/v1/ask",
        json={"question": question, "top_k": top_k, "max_tokens": max_tokens, "debug": True},
        timeout=600,
    )
    r.raise_for_status()
    out = r.json()
    out["_wall_s"] = time.perf_counter() - start
    return out


async def ask_all(
    answerer: Answerer | None,
    url: str | None,
    questions: list[dict],
    top_k: int,
    max_tokens: int,
    concurrency: int,
) -> list[dict]:
    """Every question's reply, in order, with up to `concurrency` questions in flight.

    Concurrent questions share decode steps (continuous batching), so the run is shorter;
    their latencies then include waiting for each other.
    """
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(q: dict) -> dict:
        nonlocal done
        async with gate:
            if answerer is not None:
                out = await ask_in_process(answerer, q["question"], top_k, max_tokens)
            else:
                assert url is not None
                out = await asyncio.to_thread(ask_http, url, q["question"], top_k, max_tokens)
        done += 1
        sys.stderr.write(
            f"[{done}/{len(questions)}] {'R' if out['refused'] else 'A'} "
            f"{q['question'][:60]!r} -> {out['answer'][:80]!r}\n"
        )
        return out

    return list(await asyncio.gather(*(one(q) for q in questions)))


def _output(p: dict) -> str | None:
    return p["raw_answer"] if p["raw_answer"] is not None else p["refusal_reason"]


def compare_with_baseline(per_question: list[dict], base: dict) -> dict[str, Any]:
    """How far this run's answers are from `base` (an earlier run's JSON) on the same ids.

    Two answers are identical when the model's raw text is; a model refusal keeps no raw
    text (the stream stops at the refusing sentence), so two model refusals count as one
    and the same output.

    `identical_generated` counts only questions both runs sent to the generator: a question
    the answerability check refuses before generating is identical in both runs whatever
    the decoding, so it would flatter the overall `identical` figure.
    """
    before = {p["id"]: p for p in base["per_question"]}
    missing = [p["id"] for p in per_question if p["id"] not in before]
    if missing:
        raise SystemExit(
            f"--baseline {base.get('dataset')!r} lacks {len(missing)} of these questions "
            f"(first: {missing[0]!r}); run both with the same --limit and --seed"
        )
    pairs = [(p, before[p["id"]]) for p in per_question]
    generated = [
        (a, b)
        for a, b in pairs
        if "not_answerable" not in (a["refusal_reason"], b["refusal_reason"])
    ]
    answerable = [(a, b) for a, b in pairs if a["answerable"]]
    acc = sum(a["correct"] for a, _ in answerable) / len(answerable) if answerable else None
    base_acc = sum(b["correct"] for _, b in answerable) / len(answerable) if answerable else None
    same = {a["id"] for a, b in pairs if _output(a) == _output(b)}
    return {
        "quantization": base.get("quantization", "none"),
        "identical": round(len(same) / len(pairs), 4) if pairs else None,
        "identical_generated": round(sum(a["id"] in same for a, _ in generated) / len(generated), 4)
        if generated
        else None,
        "generated_in_both": len(generated),
        "answer_accuracy": None if base_acc is None else round(base_acc, 4),
        "accuracy_change_points": None if acc is None else round((acc - base_acc) * 100, 2),
        "changed_ids": [a["id"] for a, _ in pairs if a["id"] not in same],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generator", default=None)
    parser.add_argument("--embedder", default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--url", default=None)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="Questions in flight at once (latencies then include queueing).",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--refusal-threshold", type=float, default=None)
    parser.add_argument("--answerable-threshold", type=float, default=None)
    parser.add_argument("--quantization", choices=SETTING_MODES, default=None)
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="An earlier run's --out JSON to compare answers with (same questions).",
    )
    parser.add_argument(
        "--retrieval-only",
        action="store_true",
        help="Only measure gold-document recall@k (no generator is loaded).",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    questions = pick(read_jsonl(args.dir / "questions.jsonl"), args.limit, args.seed)
    docs = read_jsonl(args.dir / "docs.jsonl")
    overrides: dict[str, Any] = {
        "data_dir": args.data_dir or Path(tempfile.mkdtemp(prefix="ragqa-eval-qa-")),
        "max_upload_mb": 1000,
    }
    parser_keys = (
        "generator",
        "embedder",
        "refusal_threshold",
        "top_k",
        "answerable_threshold",
        "quantization",
    )
    for key in parser_keys:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    settings = Settings(**overrides)
    top_k = settings.top_k
    source_of: dict[int, str] = {}
    answerer = None
    if args.retrieval_only:
        services, parts, source_of = ingest_docs(settings, docs)
        retriever = build_retriever(settings, services.sessions, parts)
        hits, latencies = [], []
        for q in questions:
            start = time.perf_counter()
            found = retriever.search(q["question"], top_k=top_k)
            latencies.append(time.perf_counter() - start)
            got = [source_of.get(p.document_id) for p in found.passages]
            if q.get("gold_doc_ids"):
                hits.append(bool(set(q["gold_doc_ids"]) & set(got)))
        out = {
            "dataset": args.dir.name,
            "embedder": settings.embedder,
            "questions": len(questions),
            f"gold_doc_recall@{top_k}": round(sum(hits) / len(hits), 4) if hits else None,
            "retrieval_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "retrieval_p95_ms": round(percentile(latencies, 0.95) * 1000, 2),
            "limit": args.limit,
            "seed": args.seed,
        }
        sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        return
    if args.url is None:
        services, parts, source_of = ingest_docs(settings, docs)
        load_generator(services)
        if services.generator_status.state != "ready":
            raise SystemExit(f"generator failed: {services.generator_status.detail}")
        answerer = build_answerer(
            settings,
            retriever=build_retriever(settings, services.sessions, parts),
            engine=services.extras["engine"],
            scheduler=services.extras["scheduler"],
        )
    per_question = []
    try:
        replies = asyncio.run(
            ask_all(answerer, args.url, questions, top_k, args.max_tokens, args.concurrency)
        )
    finally:
        # A refused answer leaves its request's last step running on the model thread; a
        # daemon thread still inside torch when the interpreter exits aborts the process
        # ("terminate called without an active exception", exit -6). Stopping joins it.
        if answerer is not None:
            answerer.scheduler.stop()
    for q, out in zip(questions, replies, strict=True):
        gold_docs = set(q.get("gold_doc_ids") or [])
        answerable = bool(q["answers"])
        cited = []
        for c in out.get("citations", []):
            sid = source_of.get(c["document_id"], c.get("filename", "").removesuffix(".txt"))
            good = sid in gold_docs or (answerable and is_correct(c["text"], q["answers"], "any"))
            cited.append(
                {"doc": sid, "page": c.get("page"), "chunk_id": c.get("chunk_id"), "ok": good}
            )
        retrieved = [
            source_of.get(p["document_id"], p.get("filename", "").removesuffix(".txt"))
            for p in out.get("retrieved", [])
        ]
        correct = (
            answerable
            and not out["refused"]
            and is_correct(out["answer"], q["answers"], q.get("answer_match", "any"))
        )
        per_question.append(
            {
                "id": q["id"],
                "answerable": answerable,
                "answer": out["answer"],
                "refused": out["refused"],
                "refusal_reason": out.get("refusal_reason"),
                "correct": correct,
                "citations": cited,
                "gold_in_top_k": bool(gold_docs & set(retrieved[:top_k])) if gold_docs else None,
                "max_dense": out.get("max_dense"),
                "answerable_p": out.get("answerable_p"),
                "refusal_check_evidence": out.get("evidence"),
                "raw_answer": out.get("raw_answer"),
                "ttft_s": out["timings"].get("ttft_ms", 0) / 1000,
                "total_s": out["timings"].get("total_ms", 0) / 1000,
            }
        )

    answerable = [p for p in per_question if p["answerable"]]
    unanswerable = [p for p in per_question if not p["answerable"]]
    citations = [c for p in per_question if not p["refused"] for c in p["citations"]]
    recall = [p["gold_in_top_k"] for p in answerable if p["gold_in_top_k"] is not None]

    def rate(items: list[Any], pred: Any) -> float | None:
        return round(sum(1 for x in items if pred(x)) / len(items), 4) if items else None

    result = {
        "dataset": args.dir.name,
        "generator": settings.generator,
        "embedder": settings.embedder,
        "questions": len(per_question),
        "answerable": len(answerable),
        "unanswerable": len(unanswerable),
        "answer_accuracy": rate(answerable, lambda p: p["correct"]),
        "refusal_rate_unanswerable": rate(unanswerable, lambda p: p["refused"]),
        "false_refusal_rate": rate(answerable, lambda p: p["refused"]),
        "citation_precision": rate(citations, lambda c: c["ok"]),
        f"gold_doc_recall@{top_k}": rate(recall, bool),
        "ttft_p50_s": round(percentile([p["ttft_s"] for p in per_question], 0.5), 3),
        "ttft_p95_s": round(percentile([p["ttft_s"] for p in per_question], 0.95), 3),
        "total_p50_s": round(percentile([p["total_s"] for p in per_question], 0.5), 3),
        "total_p95_s": round(percentile([p["total_s"] for p in per_question], 0.95), 3),
        "top_k": top_k,
        "refusal_threshold": settings.refusal_threshold,
        "answerable_threshold": answerable_threshold(settings),
        # The mode the engine loaded with ("auto" resolved), or the setting over --url.
        "quantization": services.extras["load_report"].quantization
        if args.url is None
        else settings.quantization,
        "limit": args.limit,
        "seed": args.seed,
        "concurrency": args.concurrency,
        "per_question": per_question,
    }
    if args.baseline is not None:
        base = json.loads(args.baseline.read_text(encoding="utf-8"))
        result["baseline"] = compare_with_baseline(per_question, base)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    keys = [
        "questions",
        "answer_accuracy",
        "refusal_rate_unanswerable",
        "false_refusal_rate",
        "citation_precision",
        f"gold_doc_recall@{top_k}",
        "ttft_p50_s",
        "total_p50_s",
    ]
    sys.stderr.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
    sys.stderr.write("| " + " | ".join(str(result[k]) for k in keys) + " |\n")


if __name__ == "__main__":
    main()
