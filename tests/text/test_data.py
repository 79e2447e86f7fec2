"""Tests for saetool.text.packing: tokenising and packing (cases G1-G4), with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tokenizers import models, pre_tokenizers, processors

from saetool.text.packing import PackedContexts, pack_contexts, special_token_ids, tokenize_documents

UNK, BOS, EOS = 0, 1, 2
HELLO, WORLD, HI, W = 3, 4, 5, 6
T0 = 10  # "t0".."t39" -> 10..49


def make_vocab() -> dict[str, int]:
    vocab = {"[UNK]": UNK, "<s>": BOS, "</s>": EOS, "hello": HELLO, "world": WORLD, "hi": HI, "w": W}
    vocab.update({f"t{i}": T0 + i for i in range(40)})
    return vocab


def make_tokenizer(*, bos_post_processor: bool = False, truncate_at: int | None = None):
    """Word-level tokenizer: no pad token; optionally a BOS-adding post-processor / truncation."""
    tok = tokenizers.Tokenizer(models.WordLevel(make_vocab(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
        )
    if truncate_at is not None:
        tok.enable_truncation(max_length=truncate_at)
    kwargs = {"model_max_length": truncate_at} if truncate_at is not None else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", **kwargs
    )


def tokenizer_state(tok) -> tuple:
    return (tok.pad_token, tok.pad_token_id, tok.padding_side, len(tok), tok.model_max_length,
            tok.backend_tokenizer.truncation, tok.backend_tokenizer.padding,
            tok.backend_tokenizer.to_str())


# ---------------------------------------------------------------------------------------------- G1


def test_g1_long_document_gives_23_windows_despite_tokenizer_truncation():
    tok = make_tokenizer(truncate_at=16)  # model_max_length 16 and backend truncation at 16
    # the tokenizer alone would cut the document (this call also leaves backend truncation on)
    assert len(tok("w " * 100, truncation=True)["input_ids"]) == 16
    assert len(tok.backend_tokenizer.encode("w " * 100).ids) == 16
    before = tokenizer_state(tok)
    text = " ".join(["w"] * 3000)

    docs = tokenize_documents([text], tok)
    assert [len(d) for d in docs] == [3000]
    docs_ds = tokenize_documents(datasets.Dataset.from_dict({"text": [text]}), tok)
    assert [len(d) for d in docs_ds] == [3000]
    assert tokenizer_state(tok) == before

    packed = pack_contexts(docs, 128, bos_token_id=BOS, sep_token_id=EOS)
    assert packed.tokens.shape == (23, 128)  # floor(3001 / 128) = 23 = 3000 // 127
    assert packed.tokens.dtype == torch.int64 and packed.mask.dtype == torch.bool
    assert (packed.tokens[:, 0] == BOS).all() and (packed.tokens[:, 1:] == W).all()
    assert not packed.mask[:, 0].any() and packed.mask[:, 1:].all()
    assert packed.summary() == {
        "n_contexts": 23, "context_size": 128, "n_documents": 1, "n_empty_documents": 0,
        "n_text_tokens": 2921, "n_dropped_tokens": 79, "n_pad_tokens": 0,
    }


# ---------------------------------------------------------------------------------------------- G2


def test_g2_tiny_dataset_raises_clear_error_and_leaves_tokenizer_alone():
    tok = make_tokenizer()
    assert tok.pad_token is None
    before = tokenizer_state(tok)

    docs = tokenize_documents(["Hello", "world", "today"], tok)
    assert docs == [[UNK], [WORLD], [UNK]]  # "Hello"/"today" are not in the lowercase vocab
    assert all(0 <= i < len(tok) for d in docs for i in d)
    ids = special_token_ids(tok)
    assert ids == {"bos": BOS, "sep": EOS, "pad": EOS}
    with pytest.raises(ValueError, match=r"^3 tokens < one context of 32"):
        pack_contexts(docs, 32, bos_token_id=ids["bos"], sep_token_id=ids["sep"])
    with pytest.raises(ValueError, match=r"^3 tokens < one context of 32"):
        pack_contexts(docs, 32, bos_token_id=None, sep_token_id=EOS, prepend_bos=False)
    assert tokenizer_state(tok) == before


def test_g2_no_concat_pads_and_masks_each_document():
    packed = pack_contexts([[UNK], [WORLD], [UNK]], 4, bos_token_id=BOS, sep_token_id=EOS,
                           pad_token_id=EOS, concat=False, shuffle=False)
    assert packed.tokens.tolist() == [[1, 0, 2, 2], [1, 4, 2, 2], [1, 0, 2, 2]]
    assert packed.mask.tolist() == [[False, True, False, False]] * 3
    assert packed.n_pad_tokens == 6 and packed.n_text_tokens == 3 and packed.n_dropped_tokens == 0


def test_special_token_ids_fallbacks():
    class Tok:
        bos_token_id = None
        eos_token_id = 0  # id 0 is a real id, not "missing"
        pad_token_id = None

    assert special_token_ids(Tok()) == {"bos": 0, "sep": 0, "pad": 0}
    Tok.eos_token_id, Tok.bos_token_id = None, 7
    assert special_token_ids(Tok()) == {"bos": 7, "sep": 7, "pad": 0}
    Tok.pad_token_id = 9
    assert special_token_ids(Tok()) == {"bos": 7, "sep": 7, "pad": 9}


# ---------------------------------------------------------------------------------------------- G3


def test_g3_post_processor_bos_is_not_doubled():
    tok = make_tokenizer(bos_post_processor=True)
    assert tok("hello world")["input_ids"] == [BOS, HELLO, WORLD]  # the post-processor is active
    docs = tokenize_documents(["hello world"], tok)
    assert docs == [[HELLO, WORLD]]
    assert tokenize_documents(datasets.Dataset.from_dict({"text": ["hello world"]}), tok) == docs

    on = pack_contexts(docs, 3, bos_token_id=BOS, sep_token_id=EOS, prepend_bos=True)
    assert on.tokens.tolist() == [[BOS, HELLO, WORLD]]
    assert int((on.tokens == BOS).sum()) == 1
    off = pack_contexts(docs, 2, bos_token_id=BOS, sep_token_id=EOS, prepend_bos=False)
    assert off.tokens.tolist() == [[HELLO, WORLD]]
    assert int((off.tokens == BOS).sum()) == 0
    assert off.mask.tolist() == [[True, True]]


# ---------------------------------------------------------------------------------------------- G4

G4_TEXTS = ["", " ", "hi", " ".join(f"t{i}" for i in range(40))]


def g4_docs():
    docs = tokenize_documents(G4_TEXTS, make_tokenizer())
    assert docs == [[], [], [HI], list(range(10, 50))]
    return docs


def test_g4_no_concat_with_bos():
    packed = pack_contexts(g4_docs(), 8, bos_token_id=BOS, sep_token_id=EOS, pad_token_id=EOS,
                           concat=False, shuffle=False)
    assert packed.tokens.tolist() == [
        [1, 5, 2, 2, 2, 2, 2, 2],
        [1, 10, 11, 12, 13, 14, 15, 16],
        [1, 17, 18, 19, 20, 21, 22, 23],
        [1, 24, 25, 26, 27, 28, 29, 30],
        [1, 31, 32, 33, 34, 35, 36, 37],
        [1, 38, 39, 40, 41, 42, 43, 44],
        [1, 45, 46, 47, 48, 49, 2, 2],
    ]
    assert (packed.tokens[:, 0] == BOS).all()
    F, T = False, True
    assert packed.mask.tolist() == [
        [F, T, F, F, F, F, F, F],
        *[[F] + [T] * 7] * 5,
        [F, T, T, T, T, T, F, F],
    ]
    assert packed.summary() == {
        "n_contexts": 7, "context_size": 8, "n_documents": 4, "n_empty_documents": 2,
        "n_text_tokens": 41, "n_dropped_tokens": 0, "n_pad_tokens": 8,
    }


def test_g4_concat_marks_bos_and_separator():
    packed = pack_contexts(g4_docs(), 8, bos_token_id=BOS, sep_token_id=EOS, shuffle=False)
    # stream: [5, SEP, 10..49] = 42 tokens = 6 windows of 7, nothing dropped
    assert packed.tokens.tolist() == [
        [1, 5, 2, 10, 11, 12, 13, 14],
        [1, 15, 16, 17, 18, 19, 20, 21],
        [1, 22, 23, 24, 25, 26, 27, 28],
        [1, 29, 30, 31, 32, 33, 34, 35],
        [1, 36, 37, 38, 39, 40, 41, 42],
        [1, 43, 44, 45, 46, 47, 48, 49],
    ]
    expected_mask = torch.ones(6, 8, dtype=torch.bool)
    expected_mask[:, 0] = False  # BOS
    expected_mask[0, 2] = False  # separator between "hi" and the 40-word document
    assert torch.equal(packed.mask, expected_mask)
    assert packed.summary() == {
        "n_contexts": 6, "context_size": 8, "n_documents": 4, "n_empty_documents": 2,
        "n_text_tokens": 41, "n_dropped_tokens": 0, "n_pad_tokens": 0,
    }


def test_g4_concat_drops_final_partial_window():
    packed = pack_contexts(g4_docs(), 9, bos_token_id=BOS, sep_token_id=EOS, shuffle=False)
    # 42 stream tokens // 8 = 5 windows (40 stream tokens = 39 text + 1 separator); 48, 49 dropped
    assert packed.tokens.tolist() == [
        [1, 5, 2, 10, 11, 12, 13, 14, 15],
        [1, 16, 17, 18, 19, 20, 21, 22, 23],
        [1, 24, 25, 26, 27, 28, 29, 30, 31],
        [1, 32, 33, 34, 35, 36, 37, 38, 39],
        [1, 40, 41, 42, 43, 44, 45, 46, 47],
    ]
    assert (packed.n_text_tokens, packed.n_dropped_tokens) == (39, 2)
    assert int(packed.mask.sum()) == 39


def test_concat_without_bos_and_without_separator():
    packed = pack_contexts([[3, 4], [], [5, 6, 7]], 2, bos_token_id=None, sep_token_id=None,
                           prepend_bos=False, shuffle=False)
    assert packed.tokens.tolist() == [[3, 4], [5, 6]]
    assert packed.mask.all()
    assert (packed.n_text_tokens, packed.n_dropped_tokens, packed.n_empty_documents) == (4, 1, 1)


def test_argument_errors():
    with pytest.raises(ValueError, match="context_size"):
        pack_contexts([[3, 4]], 1, bos_token_id=BOS, sep_token_id=EOS)
    with pytest.raises(ValueError, match="bos_token_id"):
        pack_contexts([[3, 4]], 2, bos_token_id=None, sep_token_id=EOS)
    with pytest.raises(ValueError, match="pad_token_id"):
        pack_contexts([[3, 4]], 2, bos_token_id=BOS, sep_token_id=EOS, concat=False)
    with pytest.raises(ValueError, match=r"^0 tokens < one context of 4"):
        pack_contexts([[], []], 4, bos_token_id=BOS, sep_token_id=EOS, pad_token_id=0, concat=False)


# ----------------------------------------------------------------------------------------- shuffle


def test_seeded_shuffle_is_a_reproducible_permutation():
    docs = [list(range(100, 130)), list(range(200, 230))]  # 30 + 1 + 30 = 61 stream tokens
    kwargs = {"bos_token_id": BOS, "sep_token_id": EOS}
    plain = pack_contexts(docs, 6, shuffle=False, **kwargs)  # 61 // 5 = 12 rows
    assert plain.tokens.shape == (12, 6)
    assert plain.tokens[6].tolist() == [1, 2, 200, 201, 202, 203]  # separator opens row 6
    a = pack_contexts(docs, 6, shuffle=True, seed=0, **kwargs)
    b = pack_contexts(docs, 6, shuffle=True, seed=0, **kwargs)
    c = pack_contexts(docs, 6, shuffle=True, seed=1, **kwargs)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    perm = np.random.default_rng(0).permutation(12)
    assert torch.equal(a.tokens, plain.tokens[torch.from_numpy(perm)])
    assert torch.equal(a.mask, plain.mask[torch.from_numpy(perm)])  # mask moves with its row
    assert not torch.equal(a.tokens, plain.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert sorted(map(tuple, c.tokens.tolist())) == sorted(map(tuple, plain.tokens.tolist()))
    assert a.summary() == plain.summary()


def test_packed_contexts_is_a_dataclass_with_required_fields():
    fields = set(PackedContexts.__dataclass_fields__)
    assert fields == {"tokens", "mask", "n_documents", "n_empty_documents", "n_text_tokens",
                      "n_dropped_tokens", "n_pad_tokens"}
