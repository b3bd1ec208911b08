"""The answerability check's evidence and prompt (retrieval/answerable.py)."""

from retrieval.answerable import EXAMPLES, SYSTEM, check_messages, evidence_sentences
from tests.conftest import MODEL_DIR
from tests.docs import passage


def test_evidence_is_the_sentences_sharing_most_question_terms_in_text_order():
    passages = [
        passage(1, "Oslo is a city. The Zorblax engine was built in Oslo in 1987. It is loud."),
        passage(2, "The Zorblax engine runs on liquid nitrogen. Bees dance."),
    ]
    got = evidence_sentences("Where was the Zorblax engine built?", passages)
    assert got == (
        "The Zorblax engine was built in Oslo in 1987. The Zorblax engine runs on liquid nitrogen."
    )


def test_evidence_ties_go_to_the_higher_ranked_passage_and_earlier_sentence():
    passages = [passage(1, "Nothing here. Engines hum."), passage(2, "Engines roar. Engines sing.")]
    assert evidence_sentences("What do engines do?", passages, n=1) == "Engines hum."


def test_evidence_splits_chinese_sentences():
    passages = [passage(1, "熊猫生活在四川。大熊猫每天吃十二公斤竹子。天气很好。")]
    got = evidence_sentences("大熊猫每天吃多少竹子？", passages, n=1)
    assert got == "大熊猫每天吃十二公斤竹子。"


def test_evidence_of_no_passages_is_empty():
    assert evidence_sentences("Why?", []) == ""


def test_check_prompt_ends_with_the_question_after_worked_examples():
    messages = check_messages("Who built it?", "Ann built it.")
    assert messages[0] == {"role": "system", "content": SYSTEM}
    roles = [m["role"] for m in messages[1:]]
    assert roles == ["user", "assistant"] * len(EXAMPLES) + ["user"]
    assert {m["content"] for m in messages if m["role"] == "assistant"} == {"Yes", "No"}
    assert "Text: Ann built it." in messages[-1]["content"]
    assert "Question: Who built it?" in messages[-1]["content"]


def test_checks_of_different_questions_share_the_examples_as_token_prefix():
    from transformers import AutoTokenizer

    from generation.provision import resolve_generator

    folder = resolve_generator("smollm2-135m-instruct", MODEL_DIR, allow_hub=False)
    tok = AutoTokenizer.from_pretrained(str(folder))

    def ids(messages: list[dict[str, str]], reply: bool = True) -> list[int]:
        out = tok.apply_chat_template(messages, add_generation_prompt=reply, return_dict=True)
        return list(out["input_ids"])

    a = ids(check_messages("Who built it?", "Ann built it."))
    b = ids(check_messages("When?", "In 1990."))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    examples = ids(check_messages("q", "t")[:-1], reply=False)
    # Everything up to the last user turn (system + examples) is served from the cache.
    assert shared >= len(examples)
