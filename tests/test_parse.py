import pytest

from ingest import detect
from ingest.parse import DocInfo, ParseError, parse
from tests import docs


def _blocks(data: bytes, filename: str = ""):
    info = DocInfo()
    kind = detect.detect(data, filename)
    return kind, list(parse(data, kind, info)), info


def test_html_named_pdf_is_detected_as_html():
    data = docs.html_bytes("T", "Heading", "Body text.")
    assert detect.detect(data, "report.pdf") == detect.HTML


def test_html_keeps_main_text_and_headings_and_drops_nav_script_footer():
    kind, blocks, info = _blocks(docs.html_bytes("Page Title", "Solar Power", "Panels work."))
    text = " ".join(b.text for b in blocks)
    assert kind == detect.HTML and info.title == "Page Title"
    assert "Panels work." in text
    for junk in ("SCRIPT_TEXT", "NAV_LINK_TEXT", "FOOTER_TEXT", "color: red"):
        assert junk not in text
    body = next(b for b in blocks if b.text == "Panels work.")
    assert body.heading_path == ("Solar Power",)


def test_pdf_blocks_carry_page_numbers():
    data = docs.pdf_bytes(["First page about apples.", "Second page about pears."], title="Fruit")
    kind, blocks, info = _blocks(data)
    assert kind == detect.PDF and info.page_count == 2 and info.title == "Fruit"
    pages = {b.text: b.page for b in blocks}
    assert pages["First page about apples."] == 1
    assert pages["Second page about pears."] == 2


def test_encrypted_pdf_fails_with_the_fix():
    with pytest.raises(ParseError, match="encrypted PDF: remove the password and upload again"):
        _blocks(docs.encrypted_pdf_bytes())


def test_pdf_without_text_layer_fails_as_scanned():
    with pytest.raises(ParseError, match=r"no extractable text \(scanned PDF\?\)"):
        _blocks(docs.blank_pdf_bytes())


def test_truncated_pdf_fails_with_the_parser_reason():
    data = docs.pdf_bytes(["Some text here."])[:300]
    with pytest.raises(ParseError, match="broken PDF"):
        _blocks(data)


def test_docx_headings_become_heading_paths():
    data = docs.docx_bytes([("Install", ["Run the installer."]), ("Usage", ["Call the API."])])
    kind, blocks, _ = _blocks(data, "x.bin")
    assert kind == detect.DOCX
    body = next(b for b in blocks if b.text == "Call the API.")
    assert body.heading_path == ("Usage",)


@pytest.mark.parametrize(
    "encoding",
    ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "gb18030", "gbk"],
)
def test_chinese_text_decodes_in_common_encodings(encoding):
    text = "人工智能是计算机科学的一个分支。它研究如何让机器像人一样思考，并解决复杂的问题。"
    text = "\n\n".join([text] * 3)
    kind, blocks, _ = _blocks(text.encode(encoding), "notes.txt")
    assert kind == detect.TEXT
    assert blocks[0].text == text.split("\n\n")[0]


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_western_text_decodes_in_legacy_encodings(encoding):
    text = "Café résumé naïve façade. The señor paid 5 € for crème brûlée."
    if encoding == "latin-1":
        text = text.replace("€", "EUR")
    _, blocks, _ = _blocks((text + "\n\n" + text).encode(encoding), "a.txt")
    assert blocks[0].text == text


def test_markdown_headings_nest():
    md = b"# Guide\n\nIntro.\n\n## Setup\n\nInstall it.\n\n```\n# not a heading\n```\n"
    kind, blocks, info = _blocks(md, "guide.md")
    assert kind == detect.MARKDOWN and info.title == "Guide"
    setup = next(b for b in blocks if b.text == "Install it.")
    assert setup.heading_path == ("Guide", "Setup")
    assert not any(b.is_heading and "not a heading" in b.text for b in blocks)


def test_legacy_office_file_is_unsupported_with_advice():
    data = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 512
    with pytest.raises(detect.UnsupportedType, match=r"save it as \.docx"):
        detect.detect(data, "old.doc")


def test_random_binary_is_unsupported_and_lists_types():
    with pytest.raises(detect.UnsupportedType, match="PDF, DOCX"):
        detect.detect(bytes(range(256)) * 8, "blob.txt")


def test_long_utf8_chinese_file_whose_head_ends_mid_character_is_text():
    sentence = "分布式训练把一个模型的计算分到多台机器上。"
    data = ("\n\n".join([sentence] * 400)).encode("utf-8")
    assert len(data) > 8192
    # make the 8192-byte head end inside a 3-byte character
    shift = next(i for i in range(3) if (8192 - i) % 3 == 1)
    data = b"a" * shift + data
    assert detect.detect(data, "notes.txt") == detect.TEXT


def test_image_is_unsupported_with_ocr_explanation():
    with pytest.raises(detect.UnsupportedType, match="no OCR"):
        detect.detect(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "scan.png")
