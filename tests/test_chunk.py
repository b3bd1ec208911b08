import pytest

from ingest.chunk import Chunker, split_sentences
from ingest.parse import Block


def count_words(texts):
    # A stand-in tokenizer for the chunker's logic (every whitespace word or CJK char is one);
    # tests of the real embedder tokenizer are in test_ingest_api.
    out = []
    for t in texts:
        n = 0
        for word in t.split():
            cjk = sum(1 for ch in word if "\u4e00" <= ch <= "\u9fff")
            n += cjk + (1 if len(word) > cjk else 0)
        out.append(n)
    return out


def test_sentence_split_handles_english_and_chinese_ends():
    text = "First one. Second one! 第一句。第二句？第三句；Last"
    parts = [text[s:e] for s, e in split_sentences(text)]
    assert parts == ["First one.", "Second one!", "第一句。", "第二句？", "第三句；", "Last"]


def test_chunk_spans_point_into_extracted_text_exactly():
    blocks = [
        Block("Intro", heading_path=("Intro",), is_heading=True),
        *[Block(f"Paragraph {i} " + "word " * 20, heading_path=("Intro",)) for i in range(6)],
        Block("Next", heading_path=("Next",), is_heading=True),
        Block("Tail text here.", heading_path=("Next",), page=3),
    ]
    text, chunks = Chunker(count_words, target=50, overlap=10).chunk(blocks)
    assert chunks
    for c in chunks:
        assert text[c.char_start : c.char_end] == c.text
        assert c.token_count <= 50


def test_chunks_never_cross_a_heading():
    blocks = [
        Block("A", heading_path=("A",), is_heading=True),
        Block("alpha " * 5, heading_path=("A",)),
        Block("B", heading_path=("B",), is_heading=True),
        Block("beta " * 5, heading_path=("B",)),
    ]
    _, chunks = Chunker(count_words, target=100, overlap=0).chunk(blocks)
    assert [c.heading_path for c in chunks] == ["A", "B"]
    assert "beta" not in chunks[0].text


def test_long_paragraph_is_cut_at_sentence_ends_with_overlap():
    para = " ".join(f"Sentence number {i} is here." for i in range(40))
    text, chunks = Chunker(count_words, target=30, overlap=10).chunk([Block(para)])
    assert len(chunks) > 3
    for c in chunks:
        assert c.text.endswith(".")
        assert c.token_count <= 30
    # consecutive chunks share whole sentences (overlap), and every sentence is covered
    assert chunks[1].char_start < chunks[0].char_end
    assert chunks[-1].char_end == len(text)


def test_chinese_without_spaces_is_cut_at_chinese_sentence_ends():
    para = "".join(f"这是第{i}个句子，内容很短。" for i in range(30))
    text, chunks = Chunker(count_words, target=40, overlap=0).chunk([Block(para, page=2)])
    assert len(chunks) > 1
    assert all(c.text.endswith("。") for c in chunks)
    assert all(c.page == 2 for c in chunks)
    assert "".join(c.text for c in chunks) == text


def test_unbreakable_text_is_windowed_under_target():
    para = "x" * 10 + " " + " ".join(["token"] * 500)
    _, chunks = Chunker(count_words, target=64, overlap=0).chunk([Block(para)])
    assert all(c.token_count <= 64 for c in chunks)


def test_invalid_overlap_names_the_range():
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 50\), got 50"):
        Chunker(count_words, target=50, overlap=50)
