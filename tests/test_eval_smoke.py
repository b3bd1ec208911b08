"""The evaluation scripts run end to end on a tiny dataset the test writes itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent

DOCS = [
    ("d1", "Volcanoes", "Magma rises through the crust and erupts from volcanoes as lava."),
    ("d2", "Bees", "Honey bees tell each other where flowers are with a waggle dance."),
    ("d3", "Copper", "Copper wire conducts electricity well and resists corrosion."),
    ("d4", "Glaciers", "Glaciers carve U-shaped valleys and leave moraines behind."),
]


def _run(script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQA_")}
    env["RAGQA_MODEL_DIR"] = str(MODEL_DIR)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_eval_retrieval_reports_every_mode_on_a_tiny_beir_folder(tmp_path):
    (tmp_path / "qrels").mkdir()
    with (tmp_path / "corpus.jsonl").open("w") as fh:
        for did, title, text in DOCS:
            fh.write(json.dumps({"_id": did, "title": title, "text": text}) + "\n")
    queries = {"q1": "How do bees show where flowers are?", "q2": "What carves U-shaped valleys?"}
    with (tmp_path / "queries.jsonl").open("w") as fh:
        for qid, text in queries.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td2\t1\nq2\td4\t1\n"
    )
    result = _run("eval_retrieval.py", str(tmp_path), "--data-dir", str(tmp_path / "data"))
    assert result["queries"] == 2 and result["corpus_size"] == 4
    for mode in ("dense", "lexical", "hybrid"):
        keys = {"ndcg@10", "recall@10", "recall@100", "mrr@10", "latency_p50_ms", "latency_p95_ms"}
        assert keys <= result[mode].keys()
    assert result["hybrid"]["mrr@10"] == 1.0


@pytest.mark.slow
def test_eval_qa_scores_answers_and_refusals_on_a_tiny_dataset(tmp_path):
    with (tmp_path / "docs.jsonl").open("w") as fh:
        for did, title, text in DOCS:
            fh.write(json.dumps({"doc_id": did, "title": title, "text": text}) + "\n")
    questions = [
        {
            "id": "a1",
            "question": "What do honey bees use to show where flowers are?",
            "answers": ["waggle dance"],
            "gold_doc_ids": ["d2"],
            "lang": "en",
            "answer_match": "any",
        },
        {
            "id": "u1",
            "question": "Who painted the Mona Lisa in Florence?",
            "answers": [],
            "gold_doc_ids": [],
            "lang": "en",
            "answer_match": "any",
        },
    ]
    with (tmp_path / "questions.jsonl").open("w") as fh:
        for q in questions:
            fh.write(json.dumps(q) + "\n")
    result = _run(
        "eval_qa.py",
        str(tmp_path),
        "--generator",
        "smollm2-135m-instruct",
        "--max-tokens",
        "24",
        "--data-dir",
        str(tmp_path / "data"),
        "--concurrency",
        "2",
    )
    for key in (
        "questions",
        "answerable",
        "unanswerable",
        "answer_accuracy",
        "refusal_rate_unanswerable",
        "false_refusal_rate",
        "citation_precision",
        "gold_doc_recall@5",
        "ttft_p50_s",
        "total_p95_s",
        "generator",
        "per_question",
    ):
        assert key in result, key
    assert result["questions"] == 2 and result["answerable"] == 1
    assert result["gold_doc_recall@5"] == 1.0
    assert result["refusal_rate_unanswerable"] == 1.0  # nothing about painters in the docs
    # Both questions were in flight at once; the report keeps the questions' order.
    assert [p["id"] for p in result["per_question"]] == ["a1", "u1"]
    assert result["concurrency"] == 2


def _eval_qa_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import eval_qa
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return eval_qa


def _answer(qid: str, raw: str | None, reason: str | None, correct: bool) -> dict:
    return {
        "id": qid,
        "answerable": True,
        "raw_answer": raw,
        "refused": reason is not None,
        "refusal_reason": reason,
        "correct": correct,
    }


def test_eval_baseline_comparison_counts_identical_outputs_apart_from_check_refusals():
    eval_qa = _eval_qa_module()
    base = {
        "quantization": "none",
        "per_question": [
            _answer("a", "Paris [1].", None, True),
            _answer("b", "In 1966 [2].", None, True),
            _answer("c", None, "model_refused", False),
            _answer("d", None, "not_answerable", False),
        ],
    }
    now = [
        _answer("a", "Paris [1].", None, True),
        _answer("b", "In 1967 [2].", None, False),
        _answer("c", None, "model_refused", False),
        _answer("d", None, "not_answerable", False),
    ]
    out = eval_qa.compare_with_baseline(now, base)
    assert out["identical"] == 0.75
    # d was refused by the answerability check in both runs: no decoding to compare.
    assert out["generated_in_both"] == 3 and out["identical_generated"] == 0.6667
    assert out["changed_ids"] == ["b"]
    assert out["answer_accuracy"] == 0.5 and out["accuracy_change_points"] == -25.0


def test_eval_baseline_comparison_rejects_a_baseline_of_other_questions():
    eval_qa = _eval_qa_module()
    base = {"dataset": "squad", "per_question": [_answer("a", "x", None, True)]}
    with pytest.raises(SystemExit, match="lacks 1 of these questions"):
        eval_qa.compare_with_baseline([_answer("z", "x", None, True)], base)
