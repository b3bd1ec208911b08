"""Documents the tests write themselves (never read from ../shared)."""

from __future__ import annotations

import io

from retrieval.retriever import Passage


def passage(n: int, text: str, *, page: int | None = None) -> Passage:
    """A retrieved passage `n` (chunk and document id n) holding `text`."""
    return Passage(
        chunk_id=n,
        document_id=n,
        filename=f"f{n}.txt",
        title=None,
        page=page,
        heading_path=None,
        char_start=0,
        char_end=len(text),
        text=text,
        score=1.0,
    )


def pdf_bytes(pages: list[str], *, title: str | None = None) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4)
    if title:
        c.setTitle(title)
    for text in pages:
        y = 800
        for line in text.split("\n"):
            c.drawString(50, y, line)
            y -= 14
        c.showPage()
    c.save()
    return buf.getvalue()


def encrypted_pdf_bytes() -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes(["secret text"]))))
    writer.encrypt(user_password="hunter2", owner_password="owner")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def blank_pdf_bytes() -> bytes:
    """A PDF with pages but no text layer (what a scan without OCR looks like)."""
    return pdf_bytes(["", ""])


def docx_bytes(sections: list[tuple[str, list[str]]]) -> bytes:
    import docx

    document = docx.Document()
    for heading, paras in sections:
        document.add_heading(heading, level=1)
        for para in paras:
            document.add_paragraph(para)
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def html_bytes(title: str, heading: str, body: str) -> bytes:
    return f"""<!DOCTYPE html><html><head><title>{title}</title>
<style>.x {{ color: red }}</style><script>var tracking = "SCRIPT_TEXT";</script></head>
<body><nav><a href="/">NAV_LINK_TEXT</a></nav>
<main><h1>{heading}</h1><p>{body}</p></main>
<footer>FOOTER_TEXT</footer></body></html>""".encode()
