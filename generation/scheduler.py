"""Continuous batching: concurrent requests share each decode step.

One thread owns the model. Between steps it admits new requests (prefill, reusing a cached
prompt prefix when one matches) and drops finished or cancelled ones; each step is one
batched forward over all active sequences. Sequences of different lengths are left-padded
inside one batched KV cache; the attention mask hides the padding and each row keeps its
own positions, so a row computes what it would compute alone.

Callers use `stream()` (an async iterator of `Event`s) or `generate()` (blocking).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from generation.engine import KV, Engine, _generator
from generation.params import GenerationParams
from generation.sampling import sample
from generation.stream import StreamDecoder

logger = logging.getLogger(__name__)


@dataclass
class Event:
    """A text delta while generating; the last event has `done=True` and the totals."""

    delta: str = ""
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    ttft_s: float | None = None
    error: str | None = None


@dataclass
class _Request:
    ids: list[int]
    params: GenerationParams
    cache_prefix_len: int
    emit: callable  # type: ignore[valid-type]  # called from the model thread with an Event
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Call:
    """A function to run on the model thread between steps (see `Scheduler.call`)."""

    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class _Seq:
    request: _Request
    decoder: StreamDecoder
    generator: torch.Generator | None
    seen: list[int]
    next_token: int
    generated: int = 0
    cached: int = 0
    ttft_s: float = 0.0


class Scheduler:
    """Owns the model thread.

    All model compute (and, with `start(loader=...)`, the loading too) happens on that one
    thread: measured on the 2-core CPU, a forward pass on a thread other than the one that
    loaded and warmed the model ran ~20% slower (two OpenMP thread pools competing).
    """

    def __init__(self, engine: Engine | None = None, *, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine: Engine = engine  # type: ignore[assignment]  # set by the loader if None
        self.max_batch = max_batch
        self._inbox: queue.Queue[_Request | _Call | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = False
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        # The batch: rows, their KV [B, H, T, D] per layer, left padding and real lengths.
        self._rows: list[_Seq] = []
        self._kv: KV = []
        self._pad: list[int] = []
        self.steps = 0

    # -- public API ------------------------------------------------------------------------
    def start(self, loader: Callable[[], Engine] | None = None) -> None:
        """Start the model thread; `loader` builds the engine on that thread first."""
        if self._running:
            return
        self._running = True
        self._thread = threading.Thread(
            target=self._run, args=(loader,), name="ragqa-generate", daemon=True
        )
        self._thread.start()

    def _run(self, loader: Callable[[], Engine] | None) -> None:
        if loader is not None:
            try:
                self.engine = loader()
            except BaseException as exc:
                self.load_error = exc
                self._running = False
                self.ready.set()
                return
        self.ready.set()
        self._loop()

    def stop(self) -> None:
        self._running = False
        self._inbox.put(None)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread between decode steps and return its result."""
        item = _Call(fn)
        self._inbox.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    @property
    def active(self) -> int:
        return len(self._rows)

    async def stream(
        self, ids: Sequence[int], params: GenerationParams, *, cache_prefix_len: int = 0
    ) -> AsyncIterator[Event]:
        """Async text deltas; leaving the loop early cancels the request and frees its cache."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                request.cancelled.set()

        request = _Request(
            ids=list(ids), params=params, cache_prefix_len=cache_prefix_len, emit=emit
        )
        self._inbox.put(request)
        try:
            while True:
                event = await events.get()
                yield event
                if event.done:
                    return
        finally:
            request.cancelled.set()

    def generate(
        self, ids: Sequence[int], params: GenerationParams, *, cache_prefix_len: int = 0
    ) -> tuple[str, Event]:
        """Blocking: the full text and the final event."""
        events: queue.Queue[Event] = queue.Queue()
        request = _Request(list(ids), params, cache_prefix_len, emit=events.put)
        self._inbox.put(request)
        parts: list[str] = []
        while True:
            event = events.get()
            parts.append(event.delta)
            if event.done:
                if event.error:
                    raise RuntimeError(event.error)
                return "".join(parts), event

    # -- the model thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while self._running:
            self._admit(block=not self._rows)
            self._drop_cancelled()
            if self._rows:
                try:
                    self._step()
                except Exception as exc:  # fail every active request, keep the thread alive
                    logger.exception("decode step failed")
                    for row in self._rows:
                        row.request.emit(Event(done=True, error=str(exc), finish_reason="error"))
                    self._rows, self._kv, self._pad = [], [], []

    def _admit(self, *, block: bool) -> None:
        while len(self._rows) < self.max_batch:
            try:
                request = self._inbox.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            if request is None:
                return
            block = False
            if isinstance(request, _Call):
                try:
                    request.result = request.fn()
                except BaseException as exc:
                    request.error = exc
                request.done.set()
                continue
            if request.cancelled.is_set():
                continue
            try:
                self._prefill(request)
            except Exception as exc:
                logger.exception("prefill failed")
                request.emit(Event(done=True, error=str(exc), finish_reason="error"))

    def _prefill(self, request: _Request) -> None:
        engine = self.engine
        logits, kv, cached = engine.prefill_with_prefix(request.ids, request.cache_prefix_len)
        generator = _generator(request.params, engine.device)
        seen = torch.tensor(request.ids, device=engine.device)
        suppress = engine.eos_tensor if request.params.ignore_eos else None
        token = sample(logits, request.params, seen, generator, suppress)
        row = _Seq(
            request=request,
            decoder=StreamDecoder(engine.tokenizer, request.params.stop),
            generator=generator,
            seen=list(request.ids),
            next_token=token,
            cached=cached,
            ttft_s=time.perf_counter() - request.submitted,
        )
        if self._accept(row, token):
            self._join(row, kv)

    def _accept(self, row: _Seq, token: int) -> bool:
        """Record a sampled token; False (and the final event sent) when the row is done."""
        params = row.request.params
        finish = None
        delta = ""
        if token in self.engine.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            row.generated += 1
            row.seen.append(token)
            delta = row.decoder.push(token)
            if row.decoder.stopped:
                finish = "stop"
            elif row.generated >= params.max_new_tokens:
                finish = "length"
        if finish is None:
            if delta:
                row.request.emit(Event(delta=delta))
            row.next_token = token
            return True
        delta += row.decoder.flush()
        row.request.emit(
            Event(
                delta=delta,
                done=True,
                finish_reason=finish,
                prompt_tokens=len(row.request.ids),
                completion_tokens=row.generated,
                cached_prompt_tokens=row.cached,
                ttft_s=row.ttft_s,
            )
        )
        return False

    def _join(self, row: _Seq, kv: KV) -> None:
        """Add a prefilled row, left-padding it or the batch to a common length."""
        length = kv[0][0].shape[2]
        if not self._rows:
            self._rows, self._kv, self._pad = [row], kv, [0]
            return
        current = self._kv[0][0].shape[2]
        target = max(current, length)
        merged: KV = []
        for (bk, bv), (k, v) in zip(self._kv, kv, strict=True):
            merged.append(
                (
                    torch.cat([_left_pad(bk, target - current), _left_pad(k, target - length)]),
                    torch.cat([_left_pad(bv, target - current), _left_pad(v, target - length)]),
                )
            )
        self._pad = [p + target - current for p in self._pad] + [target - length]
        self._rows.append(row)
        self._kv = merged

    def _keep(self, keep: list[int]) -> None:
        """Retain the rows at `keep`, dropping padding columns no row needs any more."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._kv, self._pad = [], [], []
            return
        index = torch.tensor(keep, device=self.engine.device)
        trim = min(self._pad[i] for i in keep)
        self._kv = [
            (k.index_select(0, index)[:, :, trim:], v.index_select(0, index)[:, :, trim:])
            for k, v in self._kv
        ]
        self._pad = [self._pad[i] - trim for i in keep]
        self._rows = [self._rows[i] for i in keep]

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled.is_set()]
        self._keep(keep)

    def _step(self) -> None:
        device = self.engine.device
        width = self._kv[0][0].shape[2]
        tokens = torch.tensor([r.next_token for r in self._rows], device=device)
        positions = torch.tensor([width - p for p in self._pad], device=device)
        pads = torch.tensor(self._pad, device=device).unsqueeze(1)
        mask = (torch.arange(width + 1, device=device).unsqueeze(0) >= pads).long()
        logits, self._kv = self.engine.decode_step(tokens, positions, mask, self._kv)
        self.steps += 1
        keep = []
        for i, row in enumerate(self._rows):
            seen = torch.tensor(row.seen, device=device)
            suppress = self.engine.eos_tensor if row.request.params.ignore_eos else None
            token = sample(logits[i], row.request.params, seen, row.generator, suppress)
            if self._accept(row, token) and not row.request.cancelled.is_set():
                keep.append(i)
        self._keep(keep)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [B, H, T, D] -> [B, H, n + T, D] with zeros in front."""
    if n == 0:
        return t
    pad = torch.zeros(t.shape[0], t.shape[1], n, t.shape[3], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)
