"""Detect a document's type from its bytes, not its name; decode text in any common encoding.

The file name is consulted only to choose among text kinds that bytes cannot tell apart
(Markdown vs plain text vs CSV). Legacy binary Office formats are recognised so that the
error can say what to do.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass

import charset_normalizer


class UnsupportedType(Exception):
    """The bytes are not a format we parse; the message names the supported ones."""


@dataclass(frozen=True)
class Kind:
    name: str
    mime: str


PDF = Kind("pdf", "application/pdf")
DOCX = Kind("docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document")
PPTX = Kind("pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation")
XLSX = Kind("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")
EPUB = Kind("epub", "application/epub+zip")
ODT = Kind("odt", "application/vnd.oasis.opendocument.text")
RTF = Kind("rtf", "application/rtf")
HTML = Kind("html", "text/html")
XML = Kind("xml", "application/xml")
EML = Kind("eml", "message/rfc822")
MARKDOWN = Kind("markdown", "text/markdown")
CSV = Kind("csv", "text/csv")
TEXT = Kind("text", "text/plain")

SUPPORTED = (PDF, DOCX, PPTX, XLSX, EPUB, ODT, RTF, HTML, XML, EML, MARKDOWN, CSV, TEXT)
BY_MIME = {k.mime: k for k in SUPPORTED}


def supported_list() -> str:
    return "PDF, DOCX, PPTX, XLSX, CSV, EPUB, ODT, RTF, HTML, XML, EML, Markdown, plain text"


_BOMS = (
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xfe\xff", "utf-16-be"),
    (b"\xff\xfe", "utf-16-le"),
)
_PREFERENCE = {
    name: rank
    for rank, name in enumerate(
        [
            "utf_8",
            "gb18030",
            "gbk",
            "gb2312",
            "big5",
            "cp1252",
            "latin_1",
            "iso8859_15",
            "utf_16",
            "utf_32",
            "shift_jis",
            "euc_jp",
            "euc_kr",
            "cp1251",
            "koi8_r",
            "cp1250",
        ]
    )
}
_IMAGES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_HTML_RE = re.compile(rb"<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>]", re.IGNORECASE)
_EML_HEADER_RE = re.compile(
    r"^(from|to|subject|date|received|return-path|message-id|mime-version|delivered-to)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_MD_RE = re.compile(r"^(#{1,6}\s+\S|```|\s*[-*+]\s+\S.*$|\[[^\]]+\]\([^)]+\))", re.MULTILINE)


def decode_text(data: bytes, *, truncated: bool = False) -> str:
    """Decode bytes whose encoding is unknown (BOMs first, then charset detection).

    `truncated`: `data` is the head of a longer file and may end inside a character.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace").lstrip("\ufeff")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if truncated and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8")
    matches = list(charset_normalizer.from_bytes(data))
    if not matches:
        raise UnsupportedType(f"binary data that is not a supported type ({supported_list()})")
    # On short texts several single-byte code pages decode with equal "chaos"
    # (cp1250 vs cp1252 differ in a few letters); among near-ties prefer the common ones.
    least = min(m.chaos for m in matches)
    near = [m for m in matches if m.chaos <= least + 0.01]
    best = min(near, key=lambda m: _PREFERENCE.get(m.encoding, len(_PREFERENCE)))
    return str(best)


def _looks_binary(head: bytes) -> bool:
    if any(head.startswith(bom) for bom, _ in _BOMS):
        return False
    if not head:
        return False
    nul = head.count(b"\x00")
    if nul:
        # UTF-16/32 without BOM has NULs in a regular pattern; charset detection decides.
        best = charset_normalizer.from_bytes(head).best()
        return best is None or best.encoding not in {
            "utf_16",
            "utf_16_le",
            "utf_16_be",
            "utf_32",
            "utf_32_le",
            "utf_32_be",
        }
    control = sum(1 for b in head if b < 9 or 13 < b < 32)
    return control > len(head) * 0.1


def _zip_kind(data: bytes) -> Kind:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
            if "mimetype" in names:
                mimetype = zf.read("mimetype").decode("ascii", "replace").strip()
                if mimetype == EPUB.mime:
                    return EPUB
                if mimetype == ODT.mime:
                    return ODT
                raise UnsupportedType(
                    f"unsupported zipped format {mimetype!r}; supported: {supported_list()}"
                )
    except zipfile.BadZipFile as exc:
        raise UnsupportedType(
            f"broken zip container ({exc}); supported: {supported_list()}"
        ) from exc
    if "word/document.xml" in names:
        return DOCX
    if "ppt/presentation.xml" in names:
        return PPTX
    if "xl/workbook.xml" in names:
        return XLSX
    raise UnsupportedType(f"a zip archive that is not a document; supported: {supported_list()}")


def detect(data: bytes, filename: str = "") -> Kind:
    """The document kind of `data`; raises UnsupportedType with the list of supported types."""
    head = data[:8192]
    if b"%PDF-" in data[:1024]:
        return PDF
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(data)
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        raise UnsupportedType(
            "legacy binary Office file (.doc/.xls/.ppt): save it as .docx/.xlsx/.pptx and "
            f"upload again; supported: {supported_list()}"
        )
    if head.lstrip().startswith(b"{\\rtf"):
        return RTF
    for magic, name in _IMAGES:
        if head.startswith(magic):
            raise UnsupportedType(
                f"{name} image: ragqa reads text, not images (no OCR); upload a document with "
                f"a text layer; supported: {supported_list()}"
            )
    if _looks_binary(head):
        raise UnsupportedType(f"binary data that is not a supported type ({supported_list()})")
    text_head = decode_text(head, truncated=len(data) > len(head))[:4096]
    stripped = text_head.lstrip()
    if _HTML_RE.search(text_head.encode("utf-8", "replace")):
        return HTML
    if stripped.startswith("<?xml"):
        return HTML if "<html" in text_head.lower() else XML
    first_lines = text_head.split("\n\n", 1)[0]
    if len(_EML_HEADER_RE.findall(first_lines)) >= 2 and re.match(r"^[\w-]+:", stripped):
        return EML
    lower = filename.lower()
    if lower.endswith((".md", ".markdown")):
        return MARKDOWN
    if lower.endswith((".csv", ".tsv")):
        return CSV
    if len(re.findall(r"^#{1,6}\s+\S", text_head, re.MULTILINE)) >= 1 and _MD_RE.search(text_head):
        return MARKDOWN
    return TEXT
