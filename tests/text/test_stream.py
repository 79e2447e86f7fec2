"""Tests for saetool.text.stream: incremental packing equals `pack_contexts`, the streamed contexts equal the documented
shuffle-buffer semantics recomputed here independently, the budget stops reading, and a saved state resumes exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from saetool.text import stream as st
from saetool.text.packing import pack_contexts, tokenize_documents
from tests.helpers import WORDS, make_word_tokenizer

BOS, EOS = 0, 1


def documents(n: int = 30, seed: int = 0) -> list[str]:
    """Documents of 0 to 80 words (some empty), so contexts span documents and documents span contexts."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(0, 80)))) for _ in range(n)]


def oracle(texts, *, context_size, n_contexts, buffer_size, seed, prepend_bos=True, concat=True, tokenizer=None,
           bos=BOS, sep=EOS, pad=EOS):
    """The module docstring's definition, written out plainly: tokenise every document whole, pack everything, keep
    the first N, then the buffer. The word tokenizer and its ids unless given."""
    docs = tokenize_documents(texts, tokenizer or make_word_tokenizer())
    packed = pack_contexts(docs, context_size, bos_token_id=bos, sep_token_id=sep, pad_token_id=pad,
                           prepend_bos=prepend_bos, concat=concat, shuffle=False)
    xs = list(range(len(packed.tokens) if n_contexts is None else min(n_contexts, len(packed.tokens))))
    rng, buf, out = np.random.default_rng(seed), [], []
    for x in xs:
        if len(buf) < buffer_size:
            buf.append(x)
        else:
            j = rng.integers(buffer_size)
            out.append(buf[j])
            buf[j] = x
    out += [buf[j] for j in rng.permutation(len(buf))]
    return packed.tokens[out].numpy(), packed.mask[out].numpy()


def make_stream(texts, *, state=None, **kw):
    args = {"context_size": 8, "n_contexts": None, "buffer_size": 16, "seed": 3, "per_chunk": 5}
    args.update(kw)
    return st.ContextStream(iter(texts), make_word_tokenizer(), args.pop("context_size"), bos_token_id=BOS,
                            sep_token_id=EOS, pad_token_id=EOS, state=state, **args)


@pytest.fixture
def small_batches(monkeypatch):
    """Tokenise 3 documents at a time, so the stream crosses many tokenisation batches."""
    monkeypatch.setattr(st, "TOKENIZE_DOCS", 3)


@pytest.mark.parametrize(("concat", "prepend_bos"), [(True, True), (True, False), (False, True)])
def test_packer_in_batches_equals_pack_contexts(concat, prepend_bos):
    docs = tokenize_documents(documents(), make_word_tokenizer())
    whole = pack_contexts(docs, 8, bos_token_id=BOS, sep_token_id=EOS, pad_token_id=EOS, prepend_bos=prepend_bos,
                          concat=concat, shuffle=False)
    packer = st.ContextPacker(8, bos_token_id=BOS, sep_token_id=EOS, pad_token_id=EOS, prepend_bos=prepend_bos,
                              concat=concat)
    cuts = [0, 1, 2, 7, 7, 13, 30]  # batches of 1, 1, 5, 0, 6 and 17 documents
    parts = [packer.feed(docs[a:b]) for a, b in itertools.pairwise(cuts)]
    assert np.array_equal(np.concatenate([t for t, _ in parts]), whole.tokens.numpy())
    assert np.array_equal(np.concatenate([m for _, m in parts]), whole.mask.numpy())
    assert (packer.n_documents, packer.n_empty_documents, packer.n_text_tokens) == (  # every text token fed
        whole.n_documents, whole.n_empty_documents, whole.n_text_tokens + whole.n_dropped_tokens)


@pytest.mark.parametrize(("n_contexts", "buffer_size", "per_chunk"),
                         [(None, 16, 5), (40, 16, 5), (12, 64, 4), (None, 1, 7), (33, 1000, 8)])
def test_stream_equals_the_documented_shuffle_buffer(small_batches, n_contexts, buffer_size, per_chunk):
    texts = documents()
    stream = make_stream(texts, n_contexts=n_contexts, buffer_size=buffer_size, per_chunk=per_chunk)
    chunks = list(stream)
    tokens, mask = oracle(texts, context_size=8, n_contexts=n_contexts, buffer_size=buffer_size, seed=3)
    assert [len(t) for t, _ in chunks[:-1]] == [per_chunk] * (len(chunks) - 1) and 1 <= len(chunks[-1][0]) <= per_chunk
    assert np.array_equal(np.concatenate([t for t, _ in chunks]), tokens)
    assert np.array_equal(np.concatenate([m for _, m in chunks]), mask)
    summary = stream.summary()
    assert summary["n_contexts"] == len(tokens) and summary["n_text_tokens"] == int(mask.sum())
    assert summary["corpus_ended"] == (n_contexts is None)


def test_budget_stops_reading_an_endless_corpus():
    # An endless stream of 10-word documents: 6 contexts of BOS + 7 tokens need 42 stream tokens (4 documents and
    # their separators); the stream stops after one small tokenisation batch instead of reading forever.
    endless = (" ".join(["cat"] * 10) for _ in itertools.count())
    stream = make_stream(endless, n_contexts=6, buffer_size=4, per_chunk=4)
    assert [len(t) for t, _ in stream] == [4, 2]
    summary = stream.summary()
    assert summary["n_contexts"] == 6 and not summary["corpus_ended"]
    assert summary["n_documents_read"] <= st.TOKENIZE_DOCS


def test_corpus_smaller_than_one_context_is_refused():
    with pytest.raises(ValueError, match=r"^3 tokens < one context of 8 \(4 documents, 2 empty; "):
        list(make_stream(["cat dog", "", "the", ""]))


@pytest.mark.parametrize("stop_after", [0, 1, 3, 6])
def test_saved_state_continues_exactly(small_batches, stop_after):
    # Take the state after `stop_after` chunks (while the buffer fills, while it emits, while it drains), continue
    # in a fresh stream over the same documents: the rest equals the uninterrupted stream, and the documents
    # before the state are not tokenised again.
    texts = documents(40, seed=1)
    uninterrupted = make_stream(texts, n_contexts=45)
    full = list(uninterrupted)
    first = make_stream(texts, n_contexts=45)
    head = list(itertools.islice(first, stop_after))
    state = first.state()
    tokenised = []
    encode = st.encode_texts
    st.encode_texts = lambda tok, batch: tokenised.extend(batch) or encode(tok, batch)
    try:
        resumed = make_stream(texts, n_contexts=45, state=state)
        rest = list(resumed)
    finally:
        st.encode_texts = encode
    assert len(head) + len(rest) == len(full) == 9
    for (a, b), (c, d) in zip(head + rest, full, strict=True):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    assert resumed.summary() == uninterrupted.summary()
    assert tokenised == texts[state["n_documents_consumed"] : uninterrupted.n_docs]
