"""The decode loop: load a causal LM, prefill a prompt once, then decode with the KV cache.

`Engine.generate()` is the single-request loop in its textbook form; the scheduler
(`scheduler.py`) runs the same `prefill()` and `decode_step()` over a batch of requests.
KV caches cross function boundaries as lists of per-layer (keys, values) tensors,
each [B, kv_heads, T, head_dim].
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from generation import hugepages, lean_decode, qmatmul
from generation.attention import use_decode_attention
from generation.device import choose_device, choose_dtype, cpu_has_amx, split_dtypes
from generation.gguf_packs import find_gguf
from generation.kv import KV, append_kv
from generation.memory import available_memory
from generation.params import GenerationParams
from generation.prefix_cache import PrefixCache
from generation.provision import GGUF_NAME
from generation.quant import resolve_mode
from generation.quant_load import (
    cache_path,
    checkpoint_files,
    checkpoint_weights,
    choose_prefill_weights,
    integer_prefill_pays,
    quantize_model,
    source_fingerprint,
)
from generation.sampling import sample
from generation.stream import StreamDecoder

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    model: str
    device: str
    dtype: str
    load_s: float
    context_length: int
    quantization: str = "none"
    prefill_weights: str = "float"  # "quantized": a quantized model's prefill expands packs
    prefill_dtype: str = ""  # what long prefill matmuls multiply in; "" = `dtype`


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    ttft_s: float
    total_s: float


def kv_from_cache(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


class _SlackLayer(DynamicLayer):
    """A cache layer that starts from given tensors (no copy) and appends in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = append_kv(self.keys, key_states)
        self.values = append_kv(self.values, value_states)
        return self.keys, self.values


def slack_cache(kv: KV) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_SlackLayer(k, v) for k, v in kv]
    return cache


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, name: str, prefix_cache_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        use_decode_attention(model)
        # Built from the modules as they are now: quantization happens before this.
        self.lean = lean_decode.build(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.context_length = int(
            getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length
        )
        self.eos_ids = self._eos_ids()
        # With ignore_eos the end tokens are masked out (as transformers' min_new_tokens
        # does) rather than emitted: text after an end token is not text.
        self.eos_tensor = torch.tensor(sorted(self.eos_ids), device=self.device)
        self.prefix_cache = PrefixCache(max_entries=prefix_cache_size)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        name: str = "",
        quantization: str = "none",
        group_size: int = 64,
        prefill_weights: str = "float",
    ) -> tuple[Engine, LoadReport]:
        start = time.perf_counter()
        dev = choose_device(device)
        dt = choose_dtype(dev, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        gguf = find_gguf(Path(path)) if Path(path).is_dir() else None
        asked, quantization = quantization, resolve_mode(quantization, dev, gguf is not None)
        if quantization == "gguf" and gguf is None and dev.type == "cpu":
            folder = Path(path)
            raise ValueError(
                f"quantization gguf reads the GGUF the model was converted from, as "
                f"{folder / GGUF_NAME} or {folder.parent / GGUF_NAME}; neither exists "
                f"(int8 and int4 need no GGUF)"
            )
        on_kernels = dev.type == "cpu" and quantization != "none" and qmatmul.load()
        dt, prefill_dt = split_dtypes(dev, dtype, dt, on_kernels, quantization)
        narrow, stored = False, None
        if dev.type == "cpu" and quantization != "none" and Path(path).is_dir():
            stored, matrix_values = checkpoint_weights(Path(path))
            prefill_weights = choose_prefill_weights(
                prefill_weights,
                matrix_values * prefill_dt.itemsize,
                available_memory(),
                integer=integer_prefill_pays(
                    quantization, prefill_dt, on_kernels=on_kernels, amx=cpu_has_amx()
                ),
            )
            # A quantized model loads in the dtype its checkpoint is stored in when that is
            # narrower (bfloat16 for float32), and quantize_model widens what stays float
            # layer by layer, each float copy as its layer is packed, releasing the
            # checkpoint's pages as it goes. The packs and the floats are the same
            # (widening is exact). Peak RSS while loading the 1.5B int8: 4.3 GB instead of
            # 10.9 with prefill_weights quantized; 9.65 GB instead of 10.93 with float
            # copies (the 0.5B: 3.47 instead of 4.89), loading as fast within the noise.
            narrow = stored is not None and stored.itemsize < dt.itemsize
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=stored if narrow else dt)
        model.to(dev).eval()
        if asked != quantization:
            logger.info("quantization %s resolved to %s on %s", asked, quantization, dev)
        if quantization != "none":
            if dev.type != "cpu":
                # The packed kernels are CPU kernels; on a GPU bf16 is the fast path.
                logger.warning(
                    "quantization %s is CPU-only; keeping %s on %s", quantization, dt, dev
                )
                quantization = "none"
            else:
                folder = Path(path)
                cache: Path | None = None
                source: str | None = None
                if folder.is_dir():
                    cache = cache_path(folder, quantization, group_size)
                    packed_from = checkpoint_files(folder)
                    if quantization == "gguf" and gguf is not None:
                        packed_from.append(gguf)
                    source = source_fingerprint(packed_from)
                done = quantize_model(
                    model,
                    quantization,
                    group_size=group_size,
                    cache=cache,
                    prefill_weights=prefill_weights,
                    dtype=dt if narrow else None,
                    prefill_dtype=prefill_dt if prefill_dt != dt else None,
                    gguf=gguf,
                    source=source,
                )
                prefill_weights = str(done["prefill_weights"])
                moved = hugepages.move_packs(model)
                logger.info("%.2f GB of quantized weights on huge pages", moved / 1e9)
        if narrow:
            model.config.dtype = dt
        engine = cls(model, tokenizer, name=name or str(path))
        report = LoadReport(
            model=engine.name,
            device=str(dev),
            dtype=str(dt).removeprefix("torch."),
            load_s=round(time.perf_counter() - start, 2),
            context_length=engine.context_length,
            quantization=quantization,
            prefill_weights=prefill_weights if quantization != "none" else "float",
            prefill_dtype=str(
                dt
                if quantization == "none"
                else prefill_dt
                if prefill_weights in ("float", "integer")
                else torch.float32  # what `PrefillScratch` expands packs into
            ).removeprefix("torch."),
        )
        logger.info(
            "loaded generator %s on %s (%s, quantization %s) in %.1f s",
            report.model,
            report.device,
            report.dtype,
            report.quantization,
            report.load_s,
        )
        return engine, report

    def warm_up(self) -> None:
        """One tiny generation so the first request does not pay one-time setup costs."""
        self.generate([self.tokenizer.eos_token_id or 0] * 8, GenerationParams(max_new_tokens=2))

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return ids

    # -- prompts -------------------------------------------------------------------------
    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered with the model's own template, ready for the reply."""
        out = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])

    # -- the two forward passes ------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Run the prompt (after an optional cached prefix `past`) in one pass.

        Returns logits of the last position [V] and the KV of the whole prompt.
        """
        start = past[0][0].shape[2] if past else 0
        input_ids = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
        # An explicit all-ones mask selects the same attention kernel as transformers'
        # generate(), so greedy outputs agree bit for bit in bf16 too.
        mask = torch.ones(1, start + len(ids), dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            # Only the last position's logits are needed: the vocabulary projection of a
            # 600-token prompt would otherwise cost more than a third of the prefill.
            logits_to_keep=1,
        )
        return out.logits[0, -1], kv_from_cache(out.past_key_values)

    @torch.inference_mode()
    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
        """One token for every sequence in the batch.

        tokens: [B] next input ids   positions: [B]   mask: [B, T+1] (0 = left padding)
        kv: per layer [B, H, T, D]  ->  logits [B, V], kv per layer [B, H, T+1, D]
        (views into buffers with spare room: see `append_kv`)
        """
        if self.lean is not None:
            return self.lean(tokens, positions, mask, kv)
        return self.hf_decode_step(tokens, positions, mask, kv)

    @torch.inference_mode()
    def hf_decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
        """`decode_step` through transformers' forward (where `lean_decode` does not apply)."""
        cache = slack_cache(kv)
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            position_ids=positions.unsqueeze(1),
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1], kv_from_cache(out.past_key_values)

    def prefill_with_prefix(
        self, ids: Sequence[int], cache_prefix_len: int = 0
    ) -> tuple[torch.Tensor, KV, int]:
        """Prefill reusing the longest cached prefix; store this prompt's own prefix.

        Returns (last logits [V], kv, tokens served from the prefix cache).
        """
        ids = list(ids)
        hit = self.prefix_cache.lookup(ids)
        reused = 0
        past: KV | None = None
        if hit is not None:
            reused, past = hit
            if reused >= len(ids):  # keep at least one token to compute logits from
                reused = len(ids) - 1
                past = [(k[:, :, :reused], v[:, :, :reused]) for k, v in past]
            if reused == 0:
                past = None
        logits, kv = self.prefill(ids[reused:], past)
        if cache_prefix_len and cache_prefix_len > reused and cache_prefix_len <= len(ids):
            # Causal attention: the KV of the first n tokens does not depend on later ones.
            prefix_kv = [
                (k[:, :, :cache_prefix_len].clone(), v[:, :, :cache_prefix_len].clone())
                for k, v in kv
            ]
            self.prefix_cache.store(ids[:cache_prefix_len], prefix_kv)
        return logits, kv, reused

    def choice_probability(
        self, ids: Sequence[int], yes: Sequence[str], no: Sequence[str], cache_prefix_len: int = 0
    ) -> float:
        """P(first reply token is one of `yes`) against `no`, from a single prefill.

        Used to ask the model a yes/no question about its own prompt without decoding.
        """
        logits, _, _ = self.prefill_with_prefix(ids, cache_prefix_len)

        def first_ids(words: Sequence[str]) -> list[int]:
            out = {self.tokenizer.encode(w, add_special_tokens=False)[0] for w in words}
            return sorted(out)

        yes_ids = first_ids(yes)
        pick = torch.tensor(yes_ids + first_ids(no), device=self.device)
        probs = torch.softmax(logits.float()[pick], dim=-1)
        return float(probs[: len(yes_ids)].sum())

    # -- the single-request loop -----------------------------------------------------------
    def generate(
        self, ids: Sequence[int], params: GenerationParams, *, use_cache: bool = True
    ) -> GenerationResult:
        """Greedy or sampled generation for one prompt: prefill once, then one token per step.

        `use_cache=False` recomputes the whole sequence every step (the benchmark baseline).
        """
        ids = list(ids)
        start = time.perf_counter()
        generator = _generator(params, self.device)
        decoder = StreamDecoder(self.tokenizer, params.stop)
        seen = torch.tensor(ids, device=self.device)
        suppress = self.eos_tensor if params.ignore_eos else None
        logits, kv = self.prefill(ids)
        token = sample(logits, params, seen, generator, suppress)
        ttft = time.perf_counter() - start
        generated: list[int] = []
        finish = "length"
        while True:
            if token in self.eos_ids and not params.ignore_eos:
                finish = "stop"
                break
            generated.append(token)
            decoder.push(token)
            if decoder.stopped:
                finish = "stop"
                break
            if len(generated) >= params.max_new_tokens:
                break
            seen = torch.cat([seen, torch.tensor([token], device=self.device)])
            if use_cache:
                length = kv[0][0].shape[2]
                mask = torch.ones(1, length + 1, dtype=torch.long, device=self.device)
                step_logits, kv = self.decode_step(
                    torch.tensor([token], device=self.device),
                    torch.tensor([length], device=self.device),
                    mask,
                    kv,
                )
                logits = step_logits[0]
            else:
                logits, _ = self.prefill(ids + generated)
            token = sample(logits, params, seen, generator, suppress)
        decoder.flush()
        return GenerationResult(
            text=decoder.text,
            token_ids=generated,
            prompt_tokens=len(ids),
            finish_reason=finish,
            ttft_s=ttft,
            total_s=time.perf_counter() - start,
        )


def _generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    return generator
