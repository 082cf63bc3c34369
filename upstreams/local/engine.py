"""A GGUF model on llama.cpp's low-level API: evaluation with KV-cache reuse, and generation.

Why not ``llama_cpp.Llama``: its completions compute logprobs by sorting the whole vocabulary
in Python (about 0.38 s per token for Gemma's 262k vocabulary), and it keeps a logits matrix
of n_batch x vocabulary floats. Here llama.cpp evaluates, and numpy reads the last position's
logits in place (see sampling.py).

One context holds one sequence. :class:`LlamaCppModel` remembers which tokens the KV cache
holds; a new prompt reuses the longest common token prefix (nudging re-sends a growing prompt
many times) and evaluates only the rest (generation.py drives it token by token). The class is
not thread-safe for evaluation: the server drives it from a single worker thread (worker.py).
Tokenizing and reading token pieces only read the vocabulary and may happen on other threads,
as llama.cpp's own server does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Self

# llama.cpp synchronises its threads with an OpenMP barrier after every graph node. Measured
# on a 2-core VM, libgomp's default spin-then-sleep made two threads take ~3 s per token (the
# sleeping thread wakes slowly) against ~10 ms when waiters keep spinning through a token.
# A long bounded spin keeps them awake while generating and still lets them sleep when the
# server is idle. It must be set before the OpenMP runtime loads with llama_cpp, and a value
# the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "3000000")

import llama_cpp
import numpy as np

if not hasattr(llama_cpp, "llama_memory_seq_rm"):  # the KV-cache API of llama.cpp since mid-2025
    raise ImportError(f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} is too old for "
                      "the local upstream; install llama-cpp-python>=0.3.36")

from .defaults import DEFAULT_CTX
from .generation import EngineError, Prefill
from .sampling import Logits
from .text import piece_label

log = logging.getLogger(__name__)

DEFAULT_BATCH = 512
# A shorter common prefix (a BOS token, a chat header) is evaluated again rather than reused:
# a batch of a few tokens costs about one token's time on CPU (the weights are read once),
# and a prompt that shares so little with the last one then gets exactly the numbers a fresh
# server gives (llama.cpp rounds differently for tokens evaluated in different batches).
MIN_REUSE = 8


def uses_amx(system_info: str) -> bool:
    """Whether llama.cpp was built with its AMX kernels (``AMX_INT8 = 1`` in its system info)."""
    return "AMX_INT8 = 1" in system_info


def _model_params() -> llama_cpp.llama_model_params:
    params: llama_cpp.llama_model_params = llama_cpp.llama_model_default_params()
    # A native build on a CPU with AMX repacks quantised weights into AMX buffers, and its
    # AMX matrix kernels crashed (SIGSEGV) in batched prompt evaluation of SmolLM2's Q4_1
    # weights on a Xeon with AMX; they are also known to compute wrong results for Q4_0 and
    # Q4_1. Without extra buffer types the weights stay in plain CPU buffers, which those
    # kernels never touch; the AVX2 repacking this also turns off was not faster for the
    # bundled models (measured on an AVX2 machine: same prefill and decode times).
    if uses_amx(llama_cpp.llama_print_system_info().decode(errors="replace")):
        log.warning("llama.cpp was built with AMX; its AMX kernels are not used")
        params.use_extra_bufts = False
    return params


def default_threads() -> int:
    """Half the cores: the demo runs two upstreams (base and nudger) on one machine.

    llama.cpp's threads meet at a barrier after every graph node, so a thread that has to share
    its core stalls all of them: on 2 cores, two threads with another busy process took
    ~3 s per token where one thread takes ~20-40 ms.
    """
    return max(1, (os.cpu_count() or 2) // 2)


# ---------------------------------------------------------------------------------------------
# llama.cpp process-wide setup

_backend_lock = threading.Lock()
_backend_ready = False


def _forward_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp logs every tensor while loading; only its errors reach our log.
    if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
        log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


# llama.cpp keeps a pointer to the C callback: it must live as long as the process.
_LOG_CALLBACK = llama_cpp.llama_log_callback(_forward_log)


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


# ---------------------------------------------------------------------------------------------
# The model


class LlamaCppModel:
    """One GGUF model, one context, and the token sequence its KV cache holds."""

    def __init__(self, path: str | Path, *, n_ctx: int = DEFAULT_CTX, n_threads: int | None = None,
                 n_batch: int = DEFAULT_BATCH) -> None:
        _init_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"model file not found: {self.path}")
        threads = n_threads or default_threads()
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), _model_params())
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = min(n_ctx, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        # Gemma 3 attends through a sliding window; a windowed cache forgets old positions
        # and then cannot be cut back to an arbitrary prefix. The full-size one can.
        params.swa_full = True
        # llama.cpp's CPU flash attention works in half precision; logprobs here should be
        # those of plain attention, as llama-cpp-python and GPU servers give them.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not create a context for {self.path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.n_batch = n_batch
        self.n_threads = threads
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._cached: list[int] = []  # tokens whose keys/values the cache holds, in order
        # The logits at the end of the last prompt, kept while the cache holds that prompt:
        # the same prompt sent again (a retried or repeated probe) then costs no evaluation
        # and gets exactly the same distribution. (Evaluating its last token again would give
        # slightly different numbers: llama.cpp's CPU kernels round differently for a batch
        # than for a single token.)
        self._prompt_end: tuple[int, Logits] | None = None
        self._current: Logits | None = None  # logits served from that memo instead of llama.cpp
        self._pieces: dict[int, bytes] = {}
        self._labels: dict[int, str] = {}
        self._eog: dict[int, bool] = {}
        self.bos_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._closed = False

    # -- vocabulary (read-only, safe from any thread) ------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True,
                 ) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (``<|im_start|>``) are parsed,
        as HF tokenizers and vLLM do, so chat-formatted prompts keep their structure."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                             add_special, parse_special)
            if count >= 0:
                tokens = list(buffer[:count])
                break
            capacity = -count
        # A rendered chat template already starts with "<bos>"; adding another one (llama.cpp
        # would) degrades the model, so keep a single BOS.
        if (add_special and len(tokens) >= 2 and tokens[0] == tokens[1] == self.bos_id
                and self.bos_id >= 0):
            del tokens[0]
        return tokens

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """Text of `tokens`, special tokens written out (what vLLM's /detokenize returns)."""
        array = (llama_cpp.llama_token * max(len(tokens), 1))(*tokens)
        capacity = 16 * len(tokens) + 16
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            size = llama_cpp.llama_detokenize(self._vocab, array, len(tokens), buffer, capacity,
                                              False, special)
            if size >= 0:
                return buffer.raw[:size].decode("utf-8", errors="replace")
            capacity = -size + 1

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to generated text (control tokens such as EOS add none)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self._token_bytes(token, special=False)
        return cached

    def label(self, token: int) -> str:
        """A token's own string, special tokens written out: the keys of ``top_logprobs``."""
        cached = self._labels.get(token)
        if cached is None:
            cached = self._labels[token] = piece_label(self._token_bytes(token, special=True))
        return cached

    def token_text(self, token: int) -> str:
        """A special token's text (``<bos>``), for chat templates."""
        if token < 0:
            return ""
        return self._token_bytes(token, special=True).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """End of generation: EOS, or an end-of-turn token (``<end_of_turn>``, ``<|im_end|>``)."""
        known = self._eog.get(token)
        if known is None:
            known = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return known

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string (e.g. ``tokenizer.chat_template``)."""
        capacity = 1 << 14
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            size = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buffer, capacity)
            if size < 0:
                return None
            if size < capacity:
                return buffer.value.decode("utf-8", errors="replace")
            capacity = size + 1

    def _token_bytes(self, token: int, *, special: bool) -> bytes:
        capacity = 32
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, capacity, 0, special)
            if size >= 0:
                return buffer.raw[:size]
            capacity = -size

    # -- evaluation (one thread at a time) -----------------------------------------------------

    @property
    def cached_tokens(self) -> int:
        return len(self._cached)

    def prefill(self, prompt: Sequence[int]) -> Prefill:
        """Bring the KV cache to `prompt`, so that :meth:`logits` is the next-token distribution.

        The longest common prefix with what the cache holds is kept (when at least MIN_REUSE
        tokens long) and only the rest is evaluated. A prompt wholly in the cache needs the
        logits at its end: the memo of the last prompt has them; otherwise its last token is
        evaluated again.
        """
        if not prompt:
            raise EngineError("cannot evaluate an empty prompt")
        common = 0
        limit = min(len(self._cached), len(prompt))
        while common < limit and self._cached[common] == prompt[common]:
            common += 1
        memo = self._prompt_end
        if common == len(prompt) and memo is not None and memo[0] == len(prompt):
            self._truncate(common)
            self._current = memo[1]
            return Prefill(reused=common, evaluated=0)
        common = min(common, len(prompt) - 1)
        self._truncate(common if common >= MIN_REUSE else 0)
        reused = len(self._cached)
        self._evaluate(prompt[reused:])
        self._prompt_end = (len(prompt), self.logits().copy())
        return Prefill(reused=reused, evaluated=len(prompt) - reused)

    def advance(self, token: int) -> None:
        """Append one generated token to the sequence (its logits become current)."""
        self._evaluate((token,))

    def logits(self) -> Logits:
        """The next-token logits after the last evaluation: a view, valid until the next one."""
        if self._current is not None:
            return self._current
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)
        self._cached.clear()
        self._prompt_end = self._current = None

    def _truncate(self, keep: int) -> None:
        if keep >= len(self._cached):
            return
        if self._prompt_end is not None and keep < self._prompt_end[0]:
            self._prompt_end = None
        if keep == 0 or not llama_cpp.llama_memory_seq_rm(self._memory, 0, keep, -1):
            # A cache that cannot drop a partial sequence is started again.
            self.reset()
            return
        del self._cached[keep:]

    def _evaluate(self, tokens: Sequence[int]) -> None:
        """Decode `tokens` after the cached ones, asking for the last position's logits only."""
        if len(self._cached) + len(tokens) > self.n_ctx:
            raise EngineError(f"sequence of {len(self._cached) + len(tokens)} tokens exceeds the "
                              f"context of {self.n_ctx}")
        self._current = None
        batch = self._batch
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start:start + self.n_batch]
            last = start + len(part) == len(tokens)
            position = len(self._cached)
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = position + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            if last:
                batch.logits[len(part) - 1] = 1
            batch.n_tokens = len(part)
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                # What the cache holds after a failed decode is unknown: start afresh.
                self.reset()
                raise EngineError(f"llama_decode failed with status {status}")
            self._cached.extend(part)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
