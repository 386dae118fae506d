"""llama.cpp as a second runtime: a GGUF language model and its mmproj loaded through `llama-cpp-python` (its
`llama` and `mtmd` bindings, the library `llama-server`, `llama-mtmd-cli` and Ollama's llama.cpp runner use), a
prompt with an image tokenized the way llama.cpp does it, and greedy decoding.

The prompt is the chat template's text with the image placeholder replaced by `mtmd`'s media marker, tokenized by
`mtmd_tokenize` (text with llama.cpp's own tokenizer, the image as its embeddings), exactly what a llama.cpp server
does with a chat request; `prompt_ids` gives those ids, each image position as `image_token_id`, to compare with
transformers' ids.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import os
from dataclasses import dataclass

import numpy as np

from lvit.errors import LvitError

INSTALL = "pip install llama-cpp-python==0.3.36 (it builds llama.cpp on this machine: minutes, once)"


_RECENT = collections.deque(maxlen=20)  # llama.cpp's last log lines, for error messages
_LOGGER = None  # the ctypes callback, kept alive while llama.cpp may call it


def bindings():
    """`(llama_cpp, mtmd_cpp)`, llama.cpp's logging captured; the install advice when llama-cpp-python is missing
    (called before any work by `lvit export --gguf` when it will need them)."""
    global _LOGGER
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError:
        raise LvitError(f"lvit export --verify-gguf runs the GGUF files in llama.cpp; that needs {INSTALL}.") from None
    if _LOGGER is None:  # llama.cpp logs every tensor and image slice to stderr: keep its lines, print none
        _LOGGER = llama_cpp.llama_log_callback(lambda level, text, data: _RECENT.append(text.decode(errors="replace")))
        llama_cpp.llama_log_set(_LOGGER, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(_LOGGER, ctypes.c_void_p(0))
    return llama_cpp, mtmd_cpp


def recent_log() -> str:
    """llama.cpp's last log lines (what it said before a failure)."""
    return "".join(_RECENT).strip()


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int]
    """What llama.cpp generated greedily (its own tokens fed back)."""
    forced_top1: list[int]
    """llama.cpp's top-1 token at each step when fed a given continuation (teacher forcing), if one was given."""


class LlamaCpp:
    """A loaded GGUF pair; `generate` answers one prompt. Use as a context manager (frees the model)."""

    def __init__(self, model_path, mmproj_path, n_ctx: int = 2048, threads: int | None = None):
        llama_cpp, mtmd = bindings()
        self._lib, self._mtmd = llama_cpp, mtmd
        threads = threads or max(1, min(8, os.cpu_count() or 1))
        self.llm = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, verbose=False
        )
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads
        params.warmup = False
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.ctx:
            self.llm.close()
            raise LvitError(f"llama.cpp could not load the mmproj {mmproj_path} with {model_path}:\n{recent_log()}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.ctx:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    def marker(self) -> str:
        return self._mtmd.mtmd_default_marker().decode()

    def generate(
        self,
        text: str,
        images: list,
        image_token_id: int,
        max_new_tokens: int,
        stop: set[int],
        forced: list[int] | None = None,
        add_special: bool = True,
    ) -> Generation:
        """Greedy answer to `text` (the media marker where each of `images`, PIL images, goes)."""
        lib, mtmd = self._lib, self._mtmd
        lctx = self.llm._ctx.ctx
        lib.llama_memory_clear(lib.llama_get_memory(lctx), True)
        with self._chunks(text, images, add_special) as chunks:
            prompt = self._prompt_ids(chunks, image_token_id)
            n_past = lib.llama_pos(0)
            if mtmd.mtmd_helper_eval_chunks(self.ctx, lctx, chunks, 0, 0, self.llm.n_batch, True, ctypes.byref(n_past)):
                raise LvitError("llama.cpp could not evaluate the prompt.")
        after_prompt = self._snapshot()
        tokens: list[int] = []
        logits = after_prompt
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            tokens.append(token)
            if token in stop:
                break
            logits = self._step(token)
        forced_top1: list[int] = []
        if forced is not None:  # again from the prompt, fed the given continuation
            lib.llama_memory_seq_rm(lib.llama_get_memory(lctx), 0, n_past.value, -1)
            logits = after_prompt
            for token in forced:
                forced_top1.append(int(np.argmax(logits)))
                if token in stop:
                    break
                logits = self._step(token)
        return Generation(prompt, tokens, forced_top1)

    def image_embeddings(self, image) -> np.ndarray:
        """What the mmproj makes of one image: the rows the language model receives, (tokens, hidden)."""
        mtmd = self._mtmd
        with self._chunks(self.marker(), [image], add_special=False) as chunks:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    continue
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise LvitError("llama.cpp could not encode an image of the check.")
                width = self._lib.llama_model_n_embd(self.llm.model)
                rows = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(n * width,))
                return rows.reshape(n, width).copy()
        raise LvitError("llama.cpp made no image chunk of an image of the check.")

    @contextlib.contextmanager
    def _chunks(self, text: str, images: list, add_special: bool):
        """`text` (the media marker where each image goes) and `images` tokenized by `mtmd_tokenize`, as a llama.cpp
        server does; freed on exit."""
        mtmd = self._mtmd
        bitmaps = [self._bitmap(image) for image in images]
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            encoded = text.encode()
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = encoded, len(encoded), add_special, True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), array, len(bitmaps)) != 0:
                raise LvitError("llama.cpp could not tokenize the prompt with its images.")
            yield chunks
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _bitmap(self, image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
        bitmap = self._mtmd.mtmd_helper_bitmap_init_from_buf(
            self.ctx, (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data)), len(data), False
        )
        if not bitmap:
            raise LvitError("llama.cpp could not read an image of the check.")
        return bitmap

    def _prompt_ids(self, chunks, image_token_id: int) -> list[int]:
        mtmd, ids = self._mtmd, []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids.extend(int(ptr[j]) for j in range(n.value))
            else:
                ids.extend([image_token_id] * mtmd.mtmd_input_chunk_get_n_tokens(chunk))
        return ids

    def _snapshot(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _step(self, token: int) -> np.ndarray:
        lib = self._lib
        array = (lib.llama_token * 1)(token)
        if lib.llama_decode(self.llm._ctx.ctx, lib.llama_batch_get_one(array, 1)) != 0:
            raise LvitError("llama.cpp could not decode a token.")
        return self._snapshot()
