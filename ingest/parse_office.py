"""Parsers for binary and zipped document formats: PDF, DOCX, PPTX, XLSX, EPUB, ODT, RTF.

Each takes the bytes and a `DocInfo` and yields `Block`s; failures become `ParseError`
with the library's reason. PDF pages are read one at a time.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

from ingest import detect
from ingest.parse import Block, DocInfo, HeadingTracker, ParseError, clean, paragraphs

logger = logging.getLogger(__name__)
# pypdf reports every recoverable oddity as a warning; one per page floods the log.
logging.getLogger("pypdf").setLevel(logging.ERROR)


def parse_pdf(data: bytes, info: DocInfo) -> Iterator[Block]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password and open without one.
            try:
                if not reader.decrypt(""):
                    raise ParseError("encrypted PDF: remove the password and upload again")
            except (FileNotDecryptedError, NotImplementedError) as exc:
                raise ParseError("encrypted PDF: remove the password and upload again") from exc
        pages = reader.pages
        count = len(pages)
    except ParseError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        raise ParseError(f"broken PDF: {exc}") from exc
    info.page_count = count
    try:
        meta_title = (reader.metadata or {}).get("/Title")
        if meta_title and str(meta_title).strip():
            info.title = str(meta_title).strip()
    except Exception:  # broken metadata must not fail an otherwise readable PDF
        logger.debug("unreadable PDF metadata", exc_info=True)
    found_text = False
    for number in range(count):
        try:
            text = pages[number].extract_text() or ""
        except FileNotDecryptedError as exc:
            raise ParseError("encrypted PDF: remove the password and upload again") from exc
        except Exception as exc:  # pypdf raises many types on damaged page streams
            raise ParseError(f"broken PDF (page {number + 1}): {exc}") from exc
        for para in paragraphs(text):
            found_text = True
            yield Block(para, page=number + 1)
    if not found_text:
        raise ParseError("no extractable text (scanned PDF?)")


def _docx_blocks(document: object) -> Iterator[object]:
    """Paragraphs and tables in body order (python-docx lists them separately)."""
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    body = document.element.body  # type: ignore[attr-defined]
    for child in body.iterchildren():
        if not isinstance(child.tag, str):  # comments and processing instructions
            continue
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            yield Paragraph(child, document)
        elif tag == "tbl":
            yield Table(child, document)


def parse_docx(data: bytes, info: DocInfo) -> Iterator[Block]:
    import docx
    from docx.oxml.ns import qn
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises KeyError/ValueError/BadZipFile etc.
        raise ParseError(f"broken DOCX: {exc}") from exc
    title = (document.core_properties.title or "").strip()
    info.title = title or None
    headings = HeadingTracker()
    for item in _docx_blocks(document):
        if isinstance(item, Table):
            # Read cells from the XML: python-docx's grid view raises on irregular tables.
            for tr in item._tbl.tr_lst:
                cells = []
                for tc in tr.tc_lst:
                    text = clean("".join(t.text or "" for t in tc.iter(qn("w:t"))))
                    if text and (not cells or cells[-1] != text):  # merged cells repeat
                        cells.append(text)
                if cells:
                    yield Block(" | ".join(cells), heading_path=headings.path)
            continue
        text = clean(item.text)  # type: ignore[attr-defined]
        if not text:
            continue
        style = (item.style.name if item.style is not None else "") or ""  # type: ignore[attr-defined]
        match = re.match(r"Heading (\d)", style)
        if style == "Title" or match:
            level = int(match.group(1)) if match else 0
            path = headings.push(level, text)
            if info.title is None:
                info.title = text
            yield Block(text, heading_path=path, is_heading=True)
        else:
            yield Block(text, heading_path=headings.path)


def parse_pptx(data: bytes, info: DocInfo) -> Iterator[Block]:
    from pptx import Presentation

    try:
        deck = Presentation(io.BytesIO(data))
    except Exception as exc:
        raise ParseError(f"broken PPTX: {exc}") from exc
    info.page_count = len(deck.slides)
    for number, slide in enumerate(deck.slides, start=1):
        title = ""
        if slide.shapes.title is not None and slide.shapes.title.has_text_frame:
            title = clean(slide.shapes.title.text_frame.text)
        path = (title,) if title else (f"Slide {number}",)
        if title:
            yield Block(title, page=number, heading_path=path, is_heading=True)
        for shape in slide.shapes:
            if shape == slide.shapes.title or not shape.has_text_frame:
                continue
            for para in paragraphs(shape.text_frame.text):
                yield Block(para, page=number, heading_path=path)
        if slide.has_notes_slide:
            notes = clean(slide.notes_slide.notes_text_frame.text)
            if notes:
                yield Block(notes, page=number, heading_path=path)


def parse_xlsx(data: bytes, info: DocInfo) -> Iterator[Block]:
    from openpyxl import load_workbook

    try:
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:
        raise ParseError(f"broken XLSX: {exc}") from exc
    info.page_count = len(book.worksheets)
    for number, sheet in enumerate(book.worksheets, start=1):
        path = (sheet.title,)
        yield Block(sheet.title, page=number, heading_path=path, is_heading=True)
        header: list[str] | None = None
        for row in sheet.iter_rows(values_only=True):
            cells = ["" if v is None else str(v).strip() for v in row]
            if not any(cells):
                continue
            if header is None:
                header = cells
                yield Block(" | ".join(c for c in cells if c), page=number, heading_path=path)
                continue
            pairs = [f"{h}: {c}" if h else c for h, c in zip(header, cells, strict=False) if c]
            yield Block("; ".join(pairs), page=number, heading_path=path)
    book.close()


def parse_epub(data: bytes, info: DocInfo) -> Iterator[Block]:
    import ebooklib
    from ebooklib import epub

    from ingest.parse import parse_html_text

    try:
        book = epub.read_epub(io.BytesIO(data), options={"ignore_ncx": True})
    except Exception as exc:
        raise ParseError(f"broken EPUB: {exc}") from exc
    titles = book.get_metadata("DC", "title")
    if titles:
        info.title = str(titles[0][0]).strip() or None
    chapter = 0
    for item_id, _linear in book.spine:
        item = book.get_item_with_id(item_id)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        chapter += 1
        yield from parse_html_text(item.get_content(), info, page=chapter)
    info.page_count = chapter


def parse_odt(data: bytes, info: DocInfo) -> Iterator[Block]:
    from odf import teletype
    from odf.opendocument import load

    try:
        doc = load(io.BytesIO(data))
    except Exception as exc:
        raise ParseError(f"broken ODT: {exc}") from exc
    headings = HeadingTracker()
    for node in doc.text.childNodes:
        yield from _odt_node(node, headings, info, teletype)


def _odt_node(node, headings, info, teletype) -> Iterator[Block]:  # type: ignore[no-untyped-def]
    from odf.namespaces import TEXTNS

    qname = getattr(node, "qname", None)
    if qname == (TEXTNS, "h"):
        content = clean(teletype.extractText(node))
        if content:
            level = int(node.getAttribute("outlinelevel") or 1)
            path = headings.push(level, content)
            if info.title is None:
                info.title = content
            yield Block(content, heading_path=path, is_heading=True)
    elif qname == (TEXTNS, "p"):
        content = clean(teletype.extractText(node))
        if content:
            yield Block(content, heading_path=headings.path)
    else:
        for child in getattr(node, "childNodes", []):
            yield from _odt_node(child, headings, info, teletype)


def parse_rtf(data: bytes, info: DocInfo) -> Iterator[Block]:
    from striprtf.striprtf import rtf_to_text

    raw = detect.decode_text(data)
    try:
        text = rtf_to_text(raw, errors="ignore")
    except Exception as exc:
        raise ParseError(f"broken RTF: {exc}") from exc
    for para in paragraphs(text):
        yield Block(para)
