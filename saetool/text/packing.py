"""Documents -> token contexts, in memory: tokenise documents, pack them into fixed-size contexts.

This module defines the packing policy; `saetool.text.stream` applies the same policy to a stream of documents
(what `saetool generate` uses), and `pack_contexts` below is its in-memory statement (and the tests' oracle).
Documents come from `saetool.text.sources`.

1. ``tokenize_documents(texts, tokenizer)`` returns one list of token ids per document, with
   ``add_special_tokens=False`` and no truncation, so the text is never cut and the tokenizer's
   post-processor never adds a BOS/EOS of its own (BOS is added only by packing, exactly once).
2. ``pack_contexts(docs, context_size, ...)`` returns ``PackedContexts``: int64 token rows of
   ``context_size`` and a bool mask that is True exactly at real text tokens.

Packing policy
--------------
Let ``w = context_size - 1`` when ``prepend_bos`` (each row is BOS + ``w`` stream tokens), else
``w = context_size``.

* ``concat=True`` (default): documents with 0 tokens are skipped and counted
  (``n_empty_documents``). The other documents are joined, in order, into one stream with ONE
  separator token (``sep_token_id``) between consecutive documents (none before the first or after
  the last; ``sep_token_id=None`` joins them with no separator). The stream is cut into consecutive
  windows of ``w`` tokens, each prefixed with BOS when ``prepend_bos``. Long documents are kept whole
  and span several contexts. The final partial window is dropped; its text tokens are counted in
  ``n_dropped_tokens``. ``mask`` is False at the BOS column and at separator positions.
* ``concat=False``: each non-empty document is packed alone into windows of ``w`` tokens (every row
  starts with BOS when ``prepend_bos``); the document's last partial window is right-padded with
  ``pad_token_id``; padding is masked (False) and counted in ``n_pad_tokens``. No token is dropped.
* If no context can be formed, ``ValueError("N tokens < one context of C")`` is raised (before any
  model call), N being the number of text tokens.
* ``shuffle=True`` permutes the rows (tokens and mask together) with
  ``numpy.random.default_rng(seed).permutation(n_contexts)``: the order depends only on the data and
  the seed.

Example: one document of 3000 tokens, context 128, BOS on -> 3000 // 127 = 23 contexts, 2921 text
tokens placed and 79 dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import datasets

_TOKENIZE_BATCH = 1000


# --------------------------------------------------------------------------------------------------
# Tokenising


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: no special tokens, no truncation, no padding; tokenizer left as found.

    A HuggingFace fast tokenizer switches its backend truncation off when called with
    ``truncation=False``; the backend's truncation/padding settings are restored afterwards so the
    tokenizer object (and its datasets fingerprint) is unchanged.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    saved_truncation = backend.truncation if backend is not None else None
    saved_padding = backend.padding if backend is not None else None
    try:
        out = tokenizer(
            texts,
            add_special_tokens=False,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            verbose=False,
        )
    finally:
        if backend is not None:
            if saved_truncation is not None and backend.truncation != saved_truncation:
                backend.enable_truncation(**saved_truncation)
            if saved_padding is not None and backend.padding != saved_padding:
                backend.enable_padding(**saved_padding)
    return [list(ids) for ids in out["input_ids"]]


def tokenize_documents(texts: datasets.Dataset | Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Tokenise each document whole: returns one ``list[int]`` of token ids per document, in order.

    ``texts`` is a ``datasets.Dataset`` with a ``"text"`` column  or
    a sequence of strings; ``tokenizer`` a HuggingFace tokenizer. Documents are tokenised with
    ``add_special_tokens=False`` (a post-processor that adds BOS/EOS adds nothing here; BOS is
    added once by ``pack_contexts``), with no truncation (``model_max_length`` and backend
    truncation do not apply) and the text is never cut beforehand. An empty or whitespace-only
    document may give an empty list; ``pack_contexts`` skips and counts it.

    A Dataset is tokenised with ``Dataset.map(batched=True)``, so ``datasets`` caches the result;
    a sequence of strings is tokenised in batches of 1000. The tokenizer is not mutated (no pad
    token is set, nothing is added).

    Raises:
        ValueError: a Dataset without a "text" column, or a non-string document.
    """
    import datasets

    if isinstance(texts, datasets.Dataset):
        if "text" not in texts.column_names:
            raise ValueError(
                f"tokenize_documents needs a 'text' column; available columns: {texts.column_names}"
            )

        def _map(batch: dict[str, list]) -> dict[str, list[list[int]]]:
            return {"input_ids": encode_texts(tokenizer, batch["text"])}

        mapped = texts.map(
            _map,
            batched=True,
            batch_size=_TOKENIZE_BATCH,
            remove_columns=texts.column_names,
            desc="tokenize",
        )
        return [list(ids) for ids in mapped["input_ids"]]

    if isinstance(texts, str):
        raise ValueError("tokenize_documents expects a sequence of documents, not one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"document {i} is {type(text).__name__}, not str")
    docs: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        docs.extend(encode_texts(tokenizer, texts[start : start + _TOKENIZE_BATCH]))
    return docs


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """Ids used by packing: ``{"bos": bos or eos, "sep": eos or bos, "pad": pad or eos or 0}``.

    "or" means "if the first is None" (id 0 is a valid id). "bos" and "sep" are None when the
    tokenizer has neither a BOS nor an EOS token; "pad" is always an int (padding is masked, so its
    value never reaches training). Reads only; the tokenizer is not mutated.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return {
        "bos": bos if bos is not None else eos,
        "sep": eos if eos is not None else bos,
        "pad": pad if pad is not None else (eos if eos is not None else 0),
    }


# --------------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackedContexts:
    """Token contexts ready for a model, with the mask of positions to store/train on.

    tokens: int64 tensor [n_contexts, context_size].
    mask: bool tensor [n_contexts, context_size]; True = a real text token; False = BOS, separator
        or padding inserted by packing.
    n_documents: documents seen; n_empty_documents: documents with 0 tokens (skipped);
    n_text_tokens: text tokens placed in contexts (== mask.sum());
    n_dropped_tokens: text tokens not placed (the final partial window in concat mode);
    n_pad_tokens: padding positions (concat=False).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    n_documents: int
    n_empty_documents: int
    n_text_tokens: int
    n_dropped_tokens: int
    n_pad_tokens: int

    def summary(self) -> dict[str, int]:
        """The counters plus ``n_contexts`` and ``context_size``, as plain ints (for run logs)."""
        return {
            "n_contexts": int(self.tokens.shape[0]),
            "context_size": int(self.tokens.shape[1]),
            "n_documents": self.n_documents,
            "n_empty_documents": self.n_empty_documents,
            "n_text_tokens": self.n_text_tokens,
            "n_dropped_tokens": self.n_dropped_tokens,
            "n_pad_tokens": self.n_pad_tokens,
        }


def _check_id(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")


def check_packing(context_size: int, *, bos_token_id: int | None, sep_token_id: int | None,
                  pad_token_id: int | None, prepend_bos: bool, concat: bool) -> tuple[int, int]:
    """Validate packing arguments; returns ``(context_size, width)``, width = stream tokens per row.

    Raises ValueError as documented in `pack_contexts`.
    """
    if isinstance(context_size, bool) or int(context_size) != context_size or context_size < 1:
        raise ValueError(f"context_size must be a positive int, got {context_size!r}")
    context_size = int(context_size)
    if prepend_bos:
        if context_size < 2:
            raise ValueError(f"context_size must be >= 2 with prepend_bos, got {context_size}")
        if bos_token_id is None:
            raise ValueError("prepend_bos=True needs a bos_token_id (got None)")
    if not concat and pad_token_id is None:
        raise ValueError("concat=False needs a pad_token_id (got None)")
    for name, value in (("bos_token_id", bos_token_id), ("sep_token_id", sep_token_id),
                        ("pad_token_id", pad_token_id)):
        _check_id(name, value)

    return context_size, (context_size - 1 if prepend_bos else context_size)


def _stream_rows(flat: np.ndarray, lengths: np.ndarray, width: int, sep_token_id: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """concat packing: the documents (`flat` token ids, `lengths` > 0 each) joined into one stream with one separator
    between consecutive documents, cut into rows of `width`; the final partial row is dropped. Returns (rows int64
    [n, width], is_text bool [n, width], False at separators)."""
    if sep_token_id is not None and lengths.size > 1:
        boundaries = np.cumsum(lengths)[:-1]  # insert a separator before each of these
        stream = np.insert(flat, boundaries, int(sep_token_id))
        is_text = np.ones(stream.size, dtype=bool)
        is_text[boundaries + np.arange(boundaries.size)] = False
    else:
        stream, is_text = flat, np.ones(flat.size, dtype=bool)
    n_rows = stream.size // width
    return stream[:n_rows * width].reshape(n_rows, width), is_text[:n_rows * width].reshape(n_rows, width)


def _document_rows(flat: np.ndarray, lengths: np.ndarray, width: int, pad_token_id: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Packing without concat: each document alone in ceil(length / width) rows, the last one right-padded with
    `pad_token_id`. Returns (rows int64 [n, width], is_text bool [n, width], False at padding)."""
    rows_per_doc = -(-lengths // width)
    n_rows = int(rows_per_doc.sum())
    rows = np.full((n_rows, width), pad_token_id, dtype=np.int64)
    is_text = np.zeros((n_rows, width), dtype=bool)
    if n_rows:
        first_row = np.concatenate([[0], np.cumsum(rows_per_doc)[:-1]])
        doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        doc_of_token = np.repeat(np.arange(lengths.size), lengths)
        target = first_row[doc_of_token] * width + np.arange(flat.size) - doc_start[doc_of_token]
        rows.reshape(-1)[target] = flat
        is_text.reshape(-1)[target] = True
    return rows, is_text


def _flatten(docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat, lengths): every document's token ids joined in order (int64 [sum(lengths)]) and each document's
    length (int64 [n_documents]). ValueError for a negative token id."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    n_text = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=n_text)
    if n_text and flat.min() < 0:
        raise ValueError(f"token ids must be >= 0, got {int(flat.min())}")
    return flat, lengths


def _place(flat: np.ndarray, lengths: np.ndarray, width: int, concat: bool, sep_token_id: int | None,
           pad_token_id: int | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The non-empty documents (`flat` token ids, `lengths` > 0 each) in rows of `width` stream tokens, by
    `_stream_rows` (concat) or `_document_rows`. Returns (rows, is_text, text tokens placed, padding positions)."""
    if concat:
        rows, row_mask = _stream_rows(flat, lengths, width, sep_token_id)
        return rows, row_mask, int(row_mask.sum()), 0
    rows, row_mask = _document_rows(flat, lengths, width, int(pad_token_id))
    return rows, row_mask, int(flat.size), rows.size - int(flat.size)


def _with_bos(rows: np.ndarray, row_mask: np.ndarray, bos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, row_mask) [n, w] -> [n, w + 1] with a BOS column in front (masked out: False)."""
    n = len(rows)
    rows = np.concatenate([np.full((n, 1), bos_token_id, dtype=np.int64), rows], axis=1)
    row_mask = np.concatenate([np.zeros((n, 1), dtype=bool), row_mask], axis=1)
    return rows, row_mask


def pack_contexts(
    docs: Sequence[Sequence[int]],
    context_size: int,
    *,
    bos_token_id: int | None,
    sep_token_id: int | None,
    pad_token_id: int | None = None,
    prepend_bos: bool = True,
    concat: bool = True,
    shuffle: bool = True,
    seed: int = 0,
) -> PackedContexts:
    """Pack tokenised documents into ``PackedContexts`` (int64 tokens and bool mask, both
    [n_contexts, context_size]) following the module's packing policy.

    Args:
        docs: one sequence of non-negative token ids per document (e.g. from ``tokenize_documents``).
        context_size: tokens per row, BOS included.
        bos_token_id: put at position 0 of every row when ``prepend_bos``.
        sep_token_id: put between consecutive documents when ``concat`` (None: no separator).
        pad_token_id: right padding when ``concat=False`` (required then).
        prepend_bos: start every row with BOS (rows then hold ``context_size - 1`` stream tokens).
        concat: True: one stream cut into windows, final partial window dropped; False: each
            document alone, last window right-padded.
        shuffle, seed: permute the rows with ``numpy.random.default_rng(seed).permutation``.

    Raises:
        ValueError: ``context_size < 2`` with ``prepend_bos`` (or < 1); ``bos_token_id`` None with
            ``prepend_bos``; ``pad_token_id`` None with ``concat=False``; a negative token id;
            no context can be formed: "N tokens < one context of C" (N = text tokens).
    """
    context_size, width = check_packing(context_size, bos_token_id=bos_token_id, sep_token_id=sep_token_id,
                                        pad_token_id=pad_token_id, prepend_bos=prepend_bos, concat=concat)
    flat, lengths = _flatten(docs)
    n_documents, n_empty, n_text = int(lengths.size), int((lengths == 0).sum()), int(flat.size)
    rows, row_mask, n_placed, n_pad = _place(flat, lengths[lengths > 0], width, concat, sep_token_id, pad_token_id)
    n_contexts, n_dropped = len(rows), n_text - n_placed

    if n_contexts == 0:
        raise ValueError(
            f"{n_text} tokens < one context of {context_size} "
            f"({n_documents} documents, {n_empty} empty; prepend_bos={prepend_bos}, concat={concat}): "
            "use more text or a smaller context_size"
        )
    if prepend_bos:
        rows, row_mask = _with_bos(rows, row_mask, int(bos_token_id))
    if shuffle:
        perm = np.random.default_rng(seed).permutation(n_contexts)
        rows, row_mask = rows[perm], row_mask[perm]

    return PackedContexts(
        tokens=torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)),
        mask=torch.from_numpy(np.ascontiguousarray(row_mask, dtype=bool)),
        n_documents=n_documents, n_empty_documents=n_empty, n_text_tokens=n_placed, n_dropped_tokens=n_dropped,
        n_pad_tokens=n_pad,
    )
