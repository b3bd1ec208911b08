"""Token-aware chunking with provenance.

Blocks from the parser are laid end to end (joined by a blank line) into the document's
extracted text; each chunk is a span of that text, so `char_start/char_end` point at the
exact passage. Chunks never cross a heading or a page end; inside a section they are
packed from whole paragraphs, paragraphs that are too long are cut at sentence ends
(English and Chinese), and sentences that are still too long are cut into windows.
Neighbouring chunks overlap by up to `overlap` tokens of whole units.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ingest.parse import Block

SEPARATOR = "\n\n"
# A sentence ends at Chinese full stops (no space needed) or at . ! ? followed by space.
_SENTENCE_END = re.compile(r"[。！？；]+[」』”’）)]*|[.!?]+[\"'”’)\]]*(?=\s)")

TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class ChunkDraft:
    text: str
    page: int | None
    heading_path: str | None
    char_start: int
    char_end: int
    token_count: int


@dataclass
class _Unit:
    start: int
    end: int
    page: int | None
    tokens: int


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Spans of the sentences of `text` (whitespace between them belongs to neither)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if text[pos:end].strip():
            spans.append((pos, end))
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if text[pos:].strip():
        spans.append((pos, len(text)))
    return spans


def _windows(start: int, end: int, tokens: int, target: int, text: str) -> list[tuple[int, int]]:
    """Cut an unbreakable span into pieces of about `target` tokens, at spaces when possible."""
    pieces = max(2, -(-tokens // target))
    size = max(1, (end - start) // pieces)
    spans: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        cut = min(end, pos + size)
        if cut < end:
            space = text.rfind(" ", pos + size // 2, cut)
            if space > pos:
                cut = space
        if text[pos:cut].strip():
            spans.append((pos, cut))
        pos = cut
        while pos < end and text[pos] == " ":
            pos += 1
    return spans


class Chunker:
    def __init__(self, count_tokens: TokenCounter, *, target: int, overlap: int) -> None:
        if target < 8:
            raise ValueError(f"chunk target must be >= 8 tokens, got {target}")
        if not 0 <= overlap < target:
            raise ValueError(f"chunk overlap must be in [0, {target}), got {overlap}")
        self.count_tokens = count_tokens
        self.target = target
        self.overlap = overlap

    def chunk(self, blocks: Iterable[Block]) -> tuple[str, list[ChunkDraft]]:
        """Return the extracted text and its chunks."""
        parts: list[str] = []
        sections: list[tuple[tuple[str, ...], list[tuple[int, int, int | None]]]] = []
        last_page: int | None = None
        offset = 0
        for block in blocks:
            if parts:
                offset += len(SEPARATOR)
            start, end = offset, offset + len(block.text)
            parts.append(block.text)
            offset = end
            # A citation names one page, so chunks break at page ends as well as headings.
            if (
                block.is_heading
                or not sections
                or sections[-1][0] != block.heading_path
                or block.page != last_page
            ):
                sections.append((block.heading_path, []))
            last_page = block.page
            sections[-1][1].append((start, end, block.page))
        text = SEPARATOR.join(parts)
        drafts: list[ChunkDraft] = []
        for path, spans in sections:
            units = self._units(text, spans)
            for first, last in self._pack(units):
                a, b = units[first], units[last]
                drafts.append(
                    ChunkDraft(
                        text=text[a.start : b.end],
                        page=a.page,
                        heading_path=" > ".join(path) if path else None,
                        char_start=a.start,
                        char_end=b.end,
                        token_count=0,
                    )
                )
        counts = self.count_tokens([d.text for d in drafts]) if drafts else []
        drafts = [
            ChunkDraft(d.text, d.page, d.heading_path, d.char_start, d.char_end, n)
            for d, n in zip(drafts, counts, strict=True)
        ]
        return text, drafts

    def _units(self, text: str, spans: list[tuple[int, int, int | None]]) -> list[_Unit]:
        """Paragraph units; long paragraphs become sentences, long sentences windows."""
        counts = self.count_tokens([text[s:e] for s, e, _ in spans])
        units: list[_Unit] = []
        for (start, end, page), tokens in zip(spans, counts, strict=True):
            if tokens <= self.target:
                units.append(_Unit(start, end, page, tokens))
                continue
            sentences = [(start + s, start + e) for s, e in split_sentences(text[start:end])]
            sent_counts = self.count_tokens([text[s:e] for s, e in sentences])
            for (s, e), n in zip(sentences, sent_counts, strict=True):
                if n <= self.target:
                    units.append(_Unit(s, e, page, n))
                    continue
                windows = _windows(s, e, n, self.target, text)
                for (ws, we), wn in zip(
                    windows, self.count_tokens([text[a:b] for a, b in windows]), strict=True
                ):
                    units.append(_Unit(ws, we, page, wn))
        return units

    def _pack(self, units: list[_Unit]) -> list[tuple[int, int]]:
        """Greedy packing of consecutive units into chunks, as (first, last) unit indexes."""
        ranges: list[tuple[int, int]] = []
        i = 0
        while i < len(units):
            first, total, j = i, 0, i
            while j < len(units) and (j == first or total + units[j].tokens <= self.target):
                total += units[j].tokens
                j += 1
            last = j - 1
            ranges.append((first, last))
            if j >= len(units):
                break
            # Start the next chunk a few whole units back, within the overlap budget,
            # but always move forward by at least one unit.
            back, carried = j, 0
            while back - 1 > first and carried + units[back - 1].tokens <= self.overlap:
                back -= 1
                carried += units[back].tokens
            i = back
        return ranges
