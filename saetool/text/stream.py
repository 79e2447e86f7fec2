"""Documents -> packed, mixed contexts, streamed: memory and time grow with the contexts asked for, not the corpus.

`ContextStream(documents, tokenizer, ...)` reads documents lazily (`saetool.text.sources`), tokenises them in batches (each
document whole, exactly as `saetool.text.packing.tokenize_documents`), packs them with the policy of `saetool.text.packing`
(`ContextPacker`: the same contexts, in the same order, as ``pack_contexts(all_docs, shuffle=False)``) and mixes
them with a seeded shuffle buffer. Iterating it yields the store's contexts chunk by chunk.

Documents of any size: a batch holds up to ``TOKENIZE_CHARS`` characters; a document longer than
``LONG_DOCUMENT_CHARS`` (the same 1M characters: a book, a code file, a web dump) ends the batch and is tokenised
alone in pieces of about ``PIECE_CHARS`` (64k) characters cut at seams that the tokenizer certifies
(`saetool.text.pieces`: the pieces' tokens joined equal the whole document's tokenisation), and packed piece by
piece. Reading stops when the budget is read, inside a long document too, so a 50M-character document costs the text
the budget keeps plus one piece, not 50M characters of tokens. Documents up to ``LONG_DOCUMENT_CHARS`` take the
whole-document path unchanged.

Shuffle buffer (the exact definition; the tests recompute it independently)
---------------------------------------------------------------------------
Let ``x_0, x_1, ...`` be the packed contexts in stream order, ``N`` the contexts asked for (None: all), ``B`` the
buffer size and ``rng = numpy.random.default_rng(seed)``. Only ``x_0 .. x_{N-1}`` are read (reading stops there:
no text beyond the budget is tokenised, up to one tokenisation batch or one piece of a long document). Each read context ``x`` enters a buffer:
while the buffer holds fewer than ``B`` contexts, ``x`` is appended; otherwise ``j = rng.integers(B)`` is drawn,
``buffer[j]`` is emitted and replaced by ``x``. When reading stops, the remaining buffer is emitted in the order
``rng.permutation(len(buffer))``. The store holds the emitted contexts in emission order.

So the store holds exactly the first ``N`` contexts of the stream (all of them when the corpus ends first) and
the order depends only on the text, the settings and the seed. With ``N <= B`` the order is a uniform
permutation of those contexts; with ``N > B`` a context moves at most about ``B`` positions earlier and its
expected delay is ~``B`` contexts: consecutive rows come from ~``B`` contexts apart, not from across the whole
corpus. The training loader shuffles again on top (chunk order and rows within a window, per epoch).
Memory: ``B * context_size * 5`` bytes (int32 token + bool mask), e.g. 5.2 MB at the default B = 8192, C = 128.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from saetool.text.packing import check_packing, encode_texts
from saetool.text.pieces import next_piece

TOKENIZE_CHARS = 1 << 20  # a tokenisation batch holds documents up to about this many characters ...
TOKENIZE_DOCS = 1000  # ... or this many documents
CHARS_PER_TOKEN = 8  # an upper estimate, so a small budget tokenises little more text than it needs
LONG_DOCUMENT_CHARS = TOKENIZE_CHARS  # a longer document is tokenised in pieces (saetool.text.pieces) ...
PIECE_CHARS = 1 << 16  # ... of about this many characters ...
SEAM_CONTEXT_CHARS = 1 << 10  # ... each certified with this many characters of context beyond its end


class ContextPacker:
    """The packing policy of `saetool.text.packing` applied incrementally, one batch of tokenised documents at a time.

    `feed(docs)` packs a batch (each a sequence of non-negative token ids) and returns ``(tokens, mask)``, int32 and
    bool arrays ``[k, context_size]`` of the contexts completed by it; the tail of the concatenated stream (fewer
    than ``context_size - 1`` tokens) is carried to the next batch, so the contexts of all batches together equal
    ``pack_contexts(all_docs, shuffle=False)``'s. `feed_piece(ids, last=...)` packs one piece of a document given in
    pieces (a long document, `saetool.text.pieces`): its pieces, in order, pack as the document whole would (one
    separator before its first token, counted once, its last window padded with ``concat=False``). Counters:
    ``n_documents`` (a document given in pieces counts from its first piece), ``n_empty_documents``,
    ``n_text_tokens`` (text tokens fed). Raises ValueError for bad arguments as `check_packing`.
    """

    def __init__(self, context_size: int, *, bos_token_id: int | None, sep_token_id: int | None,
                 pad_token_id: int | None = None, prepend_bos: bool = True, concat: bool = True):
        self.context_size, self.width = check_packing(
            context_size, bos_token_id=bos_token_id, sep_token_id=sep_token_id, pad_token_id=pad_token_id,
            prepend_bos=prepend_bos, concat=concat)
        self.bos, self.sep, self.pad = bos_token_id, sep_token_id, pad_token_id
        self.prepend_bos, self.concat = prepend_bos, concat
        self.carry = np.zeros(0, np.int32)  # with concat=False: the tail of a document still open (given in pieces)
        self.carry_text = np.zeros(0, bool)
        self.started = False  # a non-empty document was seen (the next one gets a separator before it)
        self.n_documents = self.n_empty_documents = self.n_text_tokens = 0
        self.doc_open = False  # a document given in pieces has had its first piece but not its last
        self.doc_tokens = 0  # text tokens of the current document so far
        self._toks: list[np.ndarray] = []
        self._text: list[np.ndarray] = []
        self._size = 0

    def feed(self, docs: Iterable[Iterable[int]]) -> tuple[np.ndarray, np.ndarray]:
        self._begin()
        for doc in docs:
            self._open()
            self._add(doc)
            self._close()
        return self._cut()

    def feed_piece(self, ids: Iterable[int], *, last: bool) -> tuple[np.ndarray, np.ndarray]:
        """Pack the next piece of a document given in pieces (the first call opens it; ``last`` closes it)."""
        self._begin()
        if not self.doc_open:
            self._open()
        self._add(ids)
        if last:
            self._close()
        return self._cut()

    def _begin(self) -> None:
        self._toks, self._text, self._size = [self.carry], [self.carry_text], self.carry.size

    def _append(self, toks: np.ndarray, text: np.ndarray) -> None:
        self._toks.append(toks)
        self._text.append(text)
        self._size += toks.size

    def _open(self) -> None:
        self.n_documents += 1
        self.doc_open, self.doc_tokens = True, 0

    def _add(self, doc: Iterable[int]) -> None:
        ids = np.asarray(doc, dtype=np.int64)
        if ids.size == 0:
            return
        if ids.min() < 0:
            raise ValueError(f"token ids must be >= 0, got {int(ids.min())}")
        self.n_text_tokens += int(ids.size)
        if self.concat and self.doc_tokens == 0 and self.started and self.sep is not None:
            self._append(np.array([self.sep], np.int32), np.zeros(1, bool))
        self._append(ids.astype(np.int32), np.ones(ids.size, bool))
        self.doc_tokens += int(ids.size)
        self.started = self.concat

    def _close(self) -> None:
        if self.doc_tokens == 0:
            self.n_empty_documents += 1
        elif not self.concat and (pad := -self._size % self.width):  # the document's last window, right-padded
            self._append(np.full(pad, self.pad, np.int32), np.zeros(pad, bool))
        self.doc_open, self.doc_tokens = False, 0

    def _cut(self) -> tuple[np.ndarray, np.ndarray]:
        """The complete rows of what was added since `_begin` (BOS prepended); the rest is carried."""
        stream, is_text = np.concatenate(self._toks), np.concatenate(self._text)
        self._toks, self._text, self._size = [], [], 0
        k = stream.size // self.width
        self.carry, self.carry_text = stream[k * self.width:], is_text[k * self.width:]
        rows, row_text = stream[: k * self.width].reshape(k, self.width), is_text[: k * self.width].reshape(k, self.width)
        if self.prepend_bos:
            rows = np.concatenate([np.full((k, 1), self.bos, np.int32), rows], axis=1)
            row_text = np.concatenate([np.zeros((k, 1), bool), row_text], axis=1)
        return rows, row_text


class ContextStream:
    """The store's contexts from a stream of documents: tokenise -> pack -> shuffle buffer (module docstring).

    Args:
        documents: an iterator of str (e.g. `saetool.text.sources.open_documents`).
        tokenizer: a HuggingFace tokenizer (used as `tokenize_documents` does; not mutated).
        context_size, bos_token_id, sep_token_id, pad_token_id, prepend_bos, concat: as `ContextPacker`.
        n_contexts: contexts to produce (None: until the corpus ends).
        buffer_size: B of the shuffle buffer (>= 1), seed: its rng seed.
        per_chunk: contexts per yielded chunk.
        state: a `state()` taken from a stream with the same arguments, to continue from there; `documents` must
            then be the same documents from the start (the first ``state["n_documents_consumed"]`` are skipped
            unread by the tokenizer; with ``state["document_open"]`` the next one is the long document being read
            in pieces, continued from its character ``state["document_chars"]``, a seam).

    Iterating yields ``(tokens int32 [k, context_size], mask bool [k, context_size])`` with ``k == per_chunk``
    except for the last chunk; afterwards `summary()` has the counters and `exhausted` says whether the corpus
    ended before ``n_contexts``. Between two chunks, `state()` returns everything needed to continue (the packer's
    carry, the shuffle buffer and its rng, the rest of the current tokenisation batch, the position in a long
    document): memory and size are the buffer's plus one tokenisation batch or one piece (and the long document's
    text while it is read). Raises ValueError "N tokens < one context of C" if the corpus cannot fill
    one context (before anything is yielded), and the errors of the document iterator and `ContextPacker`.
    """

    def __init__(self, documents: Iterator[str], tokenizer: Any, context_size: int, *, bos_token_id: int | None,
                 sep_token_id: int | None, pad_token_id: int | None = None, prepend_bos: bool = True,
                 concat: bool = True, n_contexts: int | None = None, buffer_size: int = 8192, seed: int = 0,
                 per_chunk: int = 128, state: dict | None = None):
        if buffer_size < 1 or per_chunk < 1:
            raise ValueError(f"buffer_size and per_chunk must be >= 1, got {buffer_size}, {per_chunk}")
        self.packer = ContextPacker(context_size, bos_token_id=bos_token_id, sep_token_id=sep_token_id,
                                    pad_token_id=pad_token_id, prepend_bos=prepend_bos, concat=concat)
        self.documents, self.tokenizer = iter(documents), tokenizer
        self.n_asked, self.buffer_size, self.seed, self.per_chunk = n_contexts, buffer_size, seed, per_chunk
        self.rng = np.random.default_rng(seed)
        cap = buffer_size if n_contexts is None else max(1, min(buffer_size, n_contexts))
        self.buf_t = np.zeros((cap, context_size), np.int32)
        self.buf_m = np.zeros((cap, context_size), bool)
        self.size = 0  # contexts in the buffer
        self.pending_t = np.zeros((0, context_size), np.int32)  # read contexts not yet in the buffer
        self.pending_m = np.zeros((0, context_size), bool)
        self.drain: np.ndarray | None = None  # the buffer's emission order once reading stopped
        self.n_docs = self.n_read = self.n_emitted = self.n_stored_text = 0
        self.doc: str | None = None  # the long document being read in pieces (after the `n_docs` consumed ones)
        self.doc_pos = 0  # its characters already tokenised (a seam)
        self.exhausted = False
        if state is not None:
            self._load_state(state)

    # ---- reading: documents -> packed contexts in stream order -----------------------------------------------
    def _read_batch(self) -> bool:
        """Tokenise and pack the next batch of documents, or the next piece of a long document, into `pending`;
        False once the budget or corpus is done."""
        while self.n_asked is None or self.n_read < self.n_asked:
            packed = self._read_piece() if self.doc is not None else self._read_documents()
            if packed is None:
                self.exhausted = True
                return False
            rows, mask = packed
            if self.n_asked is not None:
                rows, mask = rows[: self.n_asked - self.n_read], mask[: self.n_asked - self.n_read]
            self.n_read += len(rows)
            if len(rows):
                self.pending_t, self.pending_m = rows, mask
                return True
        return False

    def _read_documents(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Tokenise and pack the next documents, whole; a long one ends the batch and is opened as `doc`. None: the
        corpus ended."""
        need = None if self.n_asked is None else (self.n_asked - self.n_read) * self.packer.width
        limit = TOKENIZE_CHARS if need is None else min(TOKENIZE_CHARS, max(4096, need * CHARS_PER_TOKEN))
        texts, chars = [], 0
        for text in self.documents:
            if len(text) > LONG_DOCUMENT_CHARS:
                self.doc, self.doc_pos = text, 0
                break
            texts.append(text)
            chars += len(text)
            if chars >= limit or len(texts) >= TOKENIZE_DOCS:
                break
        if not texts and self.doc is None:
            return None
        self.n_docs += len(texts)
        return self.packer.feed(encode_texts(self.tokenizer, texts) if texts else [])

    def _read_piece(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise and pack the next piece of the open long document (`saetool.text.pieces`)."""
        ids, end = next_piece(lambda texts: encode_texts(self.tokenizer, texts), self.doc, self.doc_pos,
                              chars=PIECE_CHARS, context=SEAM_CONTEXT_CHARS)
        last = end >= len(self.doc)
        packed = self.packer.feed_piece(ids, last=last)
        if last:
            self.doc, self.doc_pos = None, 0
            self.n_docs += 1
        else:
            self.doc_pos = end
        return packed

    # ---- mixing: the shuffle buffer ----------------------------------------------------------------------------
    def _next_context(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next context in emission order (module docstring), None when all are emitted."""
        while self.drain is None:
            if not len(self.pending_t) and not self._read_batch():
                if self.size == 0:
                    p = self.packer
                    raise ValueError(
                        f"{p.n_text_tokens} tokens < one context of {p.context_size} ({p.n_documents} documents, "
                        f"{p.n_empty_documents} empty; prepend_bos={p.prepend_bos}, concat={p.concat}): "
                        "use more text or a smaller context_size")
                self.drain = self.rng.permutation(self.size)
                break
            x_t, x_m = self.pending_t[0], self.pending_m[0]
            self.pending_t, self.pending_m = self.pending_t[1:], self.pending_m[1:]
            if self.size < self.buffer_size:
                self.buf_t[self.size], self.buf_m[self.size] = x_t, x_m
                self.size += 1
                continue
            j = self.rng.integers(self.buffer_size)
            out = self.buf_t[j].copy(), self.buf_m[j].copy()
            self.buf_t[j], self.buf_m[j] = x_t, x_m
            return out
        k = self.n_emitted - (self.n_read - self.size)  # contexts of the drain already emitted
        if k >= self.size:
            return None
        j = self.drain[k]
        return self.buf_t[j].copy(), self.buf_m[j].copy()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            chunk_t, chunk_m = [], []
            while len(chunk_t) < self.per_chunk:
                x = self._next_context()
                if x is None:
                    break
                chunk_t.append(x[0])
                chunk_m.append(x[1])
                self.n_emitted += 1
            if not chunk_t:
                return
            tokens, mask = np.stack(chunk_t), np.stack(chunk_m)
            self.n_stored_text += int(mask.sum())
            yield tokens, mask

    # ---- state ---------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue after the last yielded chunk: NumPy arrays and plain ints (see `__init__`)."""
        p = self.packer
        counters = {"n_documents_consumed": self.n_docs, "n_read": self.n_read, "n_emitted": self.n_emitted,
                    "n_stored_text": self.n_stored_text, "size": self.size, "started": int(p.started),
                    "n_documents": p.n_documents, "n_empty_documents": p.n_empty_documents,
                    "n_text_tokens": p.n_text_tokens, "document_open": int(self.doc is not None),
                    "document_chars": self.doc_pos, "piece_open": int(p.doc_open), "piece_tokens": p.doc_tokens}
        return {**counters, "rng": json.dumps(self.rng.bit_generator.state), "buf_t": self.buf_t[: self.size],
                "buf_m": self.buf_m[: self.size], "pending_t": self.pending_t, "pending_m": self.pending_m,
                "carry": p.carry, "carry_text": p.carry_text,
                "drain": np.zeros(0, np.int64) if self.drain is None else self.drain,
                "draining": int(self.drain is not None)}

    def _load_state(self, state: dict) -> None:
        p = self.packer
        self.n_docs, self.n_read = int(state["n_documents_consumed"]), int(state["n_read"])
        self.n_emitted, self.n_stored_text = int(state["n_emitted"]), int(state["n_stored_text"])
        self.size = int(state["size"])
        p.started, p.n_documents = bool(state["started"]), int(state["n_documents"])
        p.n_empty_documents, p.n_text_tokens = int(state["n_empty_documents"]), int(state["n_text_tokens"])
        self.rng.bit_generator.state = json.loads(str(state["rng"]))
        self.buf_t[: self.size], self.buf_m[: self.size] = state["buf_t"], state["buf_m"]
        self.pending_t, self.pending_m = np.asarray(state["pending_t"]), np.asarray(state["pending_m"])
        p.carry, p.carry_text = np.asarray(state["carry"]), np.asarray(state["carry_text"])
        self.drain = np.asarray(state["drain"]) if int(state["draining"]) else None
        p.doc_open, p.doc_tokens = bool(state.get("piece_open", 0)), int(state.get("piece_tokens", 0))
        is_open = bool(state.get("document_open", 0))
        for _ in range(self.n_docs + is_open):  # read past the documents already tokenised, without tokenising them
            if (doc := next(self.documents, None)) is None:
                raise ValueError(f"the text has fewer than the {self.n_docs + is_open} documents of the saved stream "
                                 "state")
        if is_open:  # the long document being read in pieces: continue at its saved seam
            self.doc, self.doc_pos = doc, int(state["document_chars"])

    def summary(self) -> dict:
        """Counters as plain ints: contexts stored, documents and text tokens read (tokenised), stored text tokens,
        and whether the corpus ended before the budget."""
        p = self.packer
        return {"n_contexts": self.n_emitted, "context_size": p.context_size, "n_documents_read": p.n_documents,
                "n_empty_documents": p.n_empty_documents, "n_text_tokens_read": p.n_text_tokens,
                "n_text_tokens": self.n_stored_text, "shuffle_buffer": self.buffer_size,
                "corpus_ended": self.exhausted}
