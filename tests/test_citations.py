"""The service's citation guarantees, independent of what the model writes."""

from app.citations import MarkerFilter, cite, clean_markers, looks_like_refusal
from tests.docs import passage


def _p(n, text):
    return passage(n, text, page=n)


PASSAGES = [
    _p(1, "The Zorblax engine runs on liquid nitrogen."),
    _p(2, "Honey bees dance to show where flowers are."),
]


def test_markers_outside_the_given_passages_are_removed_and_forms_normalised():
    assert clean_markers("A [1]. B [7]. C [1, 2]. D 【2】. E [Passage 2].", 2) == (
        "A [1]. B . C [1][2]. D [2]. E [2]."
    )


def test_streaming_filter_never_leaks_a_bad_marker_split_across_deltas():
    f = MarkerFilter(valid=2)
    pieces = ["It runs on nitrogen [", "1", "] and [", "9", "] more", "."]
    out = "".join(f.push(p) for p in pieces) + f.flush()
    assert out == "It runs on nitrogen [1] and  more."


def test_citation_to_a_passage_sharing_no_words_with_its_sentence_is_dropped():
    text, citations = cite("The engine runs on liquid nitrogen [2].", PASSAGES)
    # [2] is about bees: dropped; the sentence is then attached by inference to [1]
    assert [c.number for c in citations] == [1]
    assert citations[0].inferred is True
    assert "[2]" not in text


SYRIA = [
    _p(1, "The Syrian Civil War is a conflict in Syria between many armed groups."),
    _p(2, "Protests in March 2011 started the Syrian Civil War."),
]
SYRIA_Q = "When did the Syrian Civil War begin?"


def test_citation_sharing_only_the_questions_words_is_pointed_at_the_passage_with_the_claim():
    text, citations = cite("The Syrian Civil War began in March 2011 [1].", SYRIA, SYRIA_Q)
    # [1] shares "Syrian Civil War" with the sentence, but only [2] holds "March 2011".
    assert text == "The Syrian Civil War began in March 2011 [2]."
    assert [(c.number, c.inferred) for c in citations] == [(2, True)]


def test_citation_to_the_passage_holding_the_claim_is_kept_as_the_models():
    text, citations = cite("It began in March 2011 [2][1].", SYRIA, SYRIA_Q)
    assert text == "It began in March 2011 [2]."
    assert [(c.number, c.inferred) for c in citations] == [(2, False)]


def test_answer_without_markers_is_attached_to_the_passage_holding_its_claim():
    _, citations = cite("The Syrian Civil War began in March 2011.", SYRIA, SYRIA_Q)
    assert [(c.number, c.inferred) for c in citations] == [(2, True)]


def test_answer_without_markers_gets_inferred_citations():
    _, citations = cite("Bees dance to show where the flowers are.", PASSAGES)
    assert [(c.number, c.inferred) for c in citations] == [(2, True)]


def test_unsupported_answer_gets_no_citation():
    _, citations = cite("Paris is the capital of France.", PASSAGES)
    assert citations == []


GONGS = [
    _p(1, "戏曲锣鼓是戏曲音乐的重要组成部分。"),
    _p(2, "锣鼓经常用的节奏型称为锣鼓点，由鼓师指挥。"),
]
GONGS_Q = "锣鼓经常用的节奏型称为什么？"


def test_bare_answer_quoted_from_a_passage_is_attached_to_that_passage():
    text, citations = cite("锣鼓点", GONGS, GONGS_Q)
    assert text == "锣鼓点"
    assert [(c.number, c.inferred) for c in citations] == [(2, True)]
    _, citations = cite("“1966”.", [_p(1, "Independence came in 1966.")], "When?")
    assert [c.number for c in citations] == [1]


def test_bare_answer_found_in_no_passage_or_of_one_character_gets_no_citation():
    assert cite("鲸鱼", GONGS, GONGS_Q)[1] == []
    assert cite("鼓", GONGS, GONGS_Q)[1] == []
    assert cite("1966", [_p(1, "The code 19660 was assigned.")], "When?")[1] == []


def test_refusal_phrases_in_english_and_chinese_are_recognised():
    assert looks_like_refusal("The passages do not contain information about that.")
    assert looks_like_refusal("根据资料无法回答该问题。")
    assert not looks_like_refusal("The engine runs on liquid nitrogen [1].")
