"""Turn a document's bytes into a stream of text blocks with provenance (page, heading path).

`parse(data, kind)` yields `Block`s lazily so a 600-page PDF is processed page by page.
Parsers raise `ParseError` with a reason a user understands; nothing here raises anything
else for bad input (the worker turns unexpected exceptions into failures too).
Office-format parsers live in `parse_office.py`.
"""

from __future__ import annotations

import csv
import email
import email.policy
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ingest import detect


class ParseError(Exception):
    """The document cannot be parsed; `permanent` means retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Block:
    """One paragraph-level unit of text. Headings open a new section and are blocks too."""

    text: str
    page: int | None = None
    heading_path: tuple[str, ...] = ()
    is_heading: bool = False


@dataclass
class DocInfo:
    """Filled in by the parser as it goes (page count is known only at the end)."""

    title: str | None = None
    page_count: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


class HeadingTracker:
    """Keeps the current heading path as headings of various levels arrive."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, str]] = []

    def push(self, level: int, text: str) -> tuple[str, ...]:
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, text))
        return self.path

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.stack)


_WS_RE = re.compile(r"[ \t\r\f\v\u00a0\u3000]+")


def clean(text: str) -> str:
    """Collapse runs of spaces and drop control characters, keep line breaks."""
    text = text.replace("\x00", "")
    lines = [_WS_RE.sub(" ", line).strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


def paragraphs(text: str) -> Iterator[str]:
    for para in re.split(r"\n\s*\n", text):
        cleaned = clean(para)
        if cleaned:
            yield cleaned


def parse_text(data: bytes, info: DocInfo) -> Iterator[Block]:
    text = detect.decode_text(data)
    for para in paragraphs(text):
        yield Block(para)


_ATX_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def parse_markdown(data: bytes, info: DocInfo) -> Iterator[Block]:
    text = detect.decode_text(data)
    headings = HeadingTracker()
    buf: list[str] = []
    in_fence = False

    def flush() -> Iterator[Block]:
        if buf:
            para = clean("\n".join(buf))
            buf.clear()
            if para:
                yield Block(para, heading_path=headings.path)

    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
            buf.append(line)
            continue
        match = None if in_fence else _ATX_RE.match(line)
        if match:
            yield from flush()
            title = match.group(2).strip()
            if title:
                path = headings.push(len(match.group(1)), title)
                if info.title is None:
                    info.title = title
                yield Block(title, heading_path=path, is_heading=True)
        elif not line.strip() and not in_fence:
            yield from flush()
        else:
            buf.append(line)
    yield from flush()


_DROP_TAGS = ("script", "style", "noscript", "nav", "header", "footer", "aside", "form", "svg")
_BLOCK_TAGS = {"p", "li", "td", "th", "pre", "blockquote", "dd", "dt", "figcaption", "caption"}


def parse_html_text(html: str | bytes, info: DocInfo, page: int | None = None) -> Iterator[Block]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "lxml")
    if info.title is None and soup.title and soup.title.get_text(strip=True):
        info.title = soup.title.get_text(strip=True)
    for tag in soup(_DROP_TAGS):
        tag.decompose()
    for tag in soup.find_all(attrs={"role": ["navigation", "banner", "contentinfo"]}):
        tag.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    headings = HeadingTracker()
    for el in root.find_all(True):
        name = el.name or ""
        if re.fullmatch(r"h[1-6]", name):
            text = clean(el.get_text(" "))
            if text:
                path = headings.push(int(name[1]), text)
                yield Block(text, page=page, heading_path=path, is_heading=True)
        elif name in _BLOCK_TAGS or (name == "div" and not el.find(True)):
            # Only leaf-most blocks: a <li> holding a <p> yields the <p> alone.
            if el.find(list(_BLOCK_TAGS)):
                continue
            text = clean(el.get_text(" "))
            if text:
                yield Block(text, page=page, heading_path=headings.path)


def parse_html(data: bytes, info: DocInfo) -> Iterator[Block]:
    yield from parse_html_text(detect.decode_text(data), info)


def parse_xml(data: bytes, info: DocInfo) -> Iterator[Block]:
    from lxml import etree

    try:
        root = etree.fromstring(data, parser=etree.XMLParser(recover=True, resolve_entities=False))
    except etree.XMLSyntaxError as exc:
        raise ParseError(f"broken XML: {exc}") from exc
    if root is None:
        raise ParseError("broken XML: no root element")
    for el in root.iter():
        if isinstance(el.tag, str) and el.text and el.text.strip():
            text = clean(el.text)
            if text:
                yield Block(text)


def parse_csv(data: bytes, info: DocInfo) -> Iterator[Block]:
    text = detect.decode_text(data)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = csv.reader(io.StringIO(text), dialect)
    header: list[str] | None = None
    for row in rows:
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if header is None:
            header = cells
            yield Block(" | ".join(cells), heading_path=())
            continue
        pairs = [f"{h}: {c}" if h else c for h, c in zip(header, cells, strict=False) if c]
        yield Block("; ".join(pairs))


def parse_eml(data: bytes, info: DocInfo) -> Iterator[Block]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    subject = str(msg.get("subject", "") or "").strip()
    info.title = subject or None
    head = [f"{k}: {msg[k]}" for k in ("From", "To", "Date", "Subject") if msg.get(k)]
    if head:
        yield Block("\n".join(head))
    body = msg.get_body(preferencelist=("plain", "html"))
    parts = [body] if body is not None else [p for p in msg.walk() if not p.is_multipart()]
    for part in parts:
        if part is None or part.get_content_maintype() != "text":
            continue
        try:
            content = part.get_content()
        except (LookupError, UnicodeDecodeError):
            payload = part.get_payload(decode=True) or b""
            content = detect.decode_text(payload)
        if part.get_content_subtype() == "html":
            yield from parse_html_text(content, info)
        else:
            for para in paragraphs(content):
                yield Block(para)


def parse(data: bytes, kind: detect.Kind, info: DocInfo) -> Iterator[Block]:
    """Blocks of a document of `kind`; `info` gets the title and page count."""
    from ingest import parse_office

    parsers = {
        "text": parse_text,
        "markdown": parse_markdown,
        "html": parse_html,
        "xml": parse_xml,
        "csv": parse_csv,
        "eml": parse_eml,
        "pdf": parse_office.parse_pdf,
        "docx": parse_office.parse_docx,
        "pptx": parse_office.parse_pptx,
        "xlsx": parse_office.parse_xlsx,
        "epub": parse_office.parse_epub,
        "odt": parse_office.parse_odt,
        "rtf": parse_office.parse_rtf,
    }
    parser = parsers.get(kind.name)
    if parser is None:
        raise ParseError(f"no parser for {kind.name}; supported: {detect.supported_list()}")
    return parser(data, info)
