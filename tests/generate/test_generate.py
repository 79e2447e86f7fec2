"""Generation end to end on the tiny random Llama: stored activations equal HF hidden_states (fp16 rounding),
one forward for several hooks, masks, resume after a crash, refusals before any data is read."""

import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import saetool.generate as gen
from saetool.config import GenerateConfig
from saetool.store.activation_store import ActivationStore, StoreError
from tests.helpers import WORDS, interrupt_on_call

N_WORDS = 1200


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    for i in range(4):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, N_WORDS // 4 + 7 * i)))
    return d


def config(tiny_model_dir, text_dir, folder, **kw):
    base = {"model": str(tiny_model_dir), "dataset": str(text_dir), "locations": ["residual", "mlp", "attn_concat"],
                "layers": [0, 1], "context_size": 16, "chunk_size": 64, "batch_size": 3, "device": "cpu", "dataset_folder": str(folder)}
    return GenerateConfig(**{**base, **kw})


def quiet(*a):
    pass


def test_store_equals_hf_hidden_states(tiny_model_dir, text_dir, tmp_path):
    store = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "s.zarr"), log=quiet)
    spec = store.spec
    assert store.complete and spec.hook_names == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post",
        "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert spec.widths["blocks.0.hook_resid_post"] == 32 and spec.widths["blocks.1.attn.hook_z"] == 32
    # 4 docs of 300+ words joined by 3 separators, 15 text tokens per context; whole chunks of 4 contexts
    n_text = sum(N_WORDS // 4 + 7 * i for i in range(4)) + 3
    assert spec.n_contexts == n_text // 15 and spec.n_rows == spec.n_contexts * 16
    tokens = torch.from_numpy(store.group["tokens"][:]).long()
    assert (tokens[:, 0] == 0).all()  # <bos> starts every context
    mask = store.read_mask(0, spec.n_rows).reshape(-1, 16)
    assert not mask[:, 0].any() and np.array_equal(mask, (tokens != 0).numpy() & (tokens != 1).numpy())

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    outputs = []  # HF's last hidden_states entry is after the final norm, so read the last block's output directly
    hf.model.layers[1].register_forward_hook(lambda mod, inp, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hidden = list(hf(tokens, output_hidden_states=True).hidden_states)
    hidden[2] = outputs[0]
    for layer in (0, 1):
        stored = store.read_rows(f"blocks.{layer}.hook_resid_post", 0, spec.n_rows, torch.float16)
        expected = hidden[layer + 1].reshape(-1, 32).to(torch.float16)
        torch.testing.assert_close(stored, expected, atol=1e-3, rtol=1e-3)
    assert store.meta["summary"]["tokens"] == spec.n_rows


def test_crash_then_resume_equals_uninterrupted(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    clean = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "clean.zarr", n_chunks=5), log=quiet)
    original = ActivationStore.write_chunk
    calls = {"n": 0}

    def crashing(self, chunk, *args):
        if calls["n"] == 2:
            self.group["blocks.0.hook_resid_post"][self.spec.chunk_rows(chunk)[0]] = 99.0  # partial write
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return original(self, chunk, *args)

    cfg = config(tiny_model_dir, text_dir, tmp_path / "s.zarr", n_chunks=5)
    monkeypatch.setattr(ActivationStore, "write_chunk", crashing)
    with pytest.raises(KeyboardInterrupt):
        gen.run_generate(cfg, log=quiet)
    with pytest.raises(StoreError, match=r"incomplete \(2/5 chunks committed\)"):
        ActivationStore.open(tmp_path / "s.zarr")
    monkeypatch.setattr(ActivationStore, "write_chunk", original)
    messages = []
    resumed = gen.run_generate(cfg, log=messages.append)
    assert any("resuming" in m and "2/5" in m for m in messages)
    for name in clean.spec.hook_names + ["tokens", "mask"]:
        assert np.array_equal(resumed.group[name][:], clean.group[name][:]), name
    messages.clear()
    gen.run_generate(cfg, log=messages.append)
    assert any("already complete" in m for m in messages)
    with pytest.raises(StoreError, match="different settings"):
        gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "s.zarr", n_chunks=4), log=quiet)


def test_bad_hook_fails_before_reading_text(tiny_model_dir, tmp_path, monkeypatch):
    def no_text(*a, **k):
        raise AssertionError("text was read")

    monkeypatch.setattr(gen, "open_documents", no_text)
    with pytest.raises(ValueError, match="blocks.7.hook_resid_post"):
        gen.run_generate(config(tiny_model_dir, "unused", tmp_path / "s.zarr", locations=["residual"], layers=[7]),
                         log=quiet)
    assert not (tmp_path / "s.zarr").exists()


def test_empty_dataset_is_refused_before_the_store_exists(tiny_model_dir, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="0 tokens < one context of 16"):
        gen.run_generate(config(tiny_model_dir, tmp_path / "t", tmp_path / "s.zarr"), log=quiet)
    assert not (tmp_path / "s.zarr").exists()


def test_keepbits_store_is_the_bitrounded_lossless_store(tiny_model_dir, text_dir, tmp_path):
    from saetool.store.values import bitround

    kw = {"locations": ["residual"], "layers": [1], "n_chunks": 3}
    lossless = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "a.zarr", **kw), log=quiet)
    messages = []
    lossy = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "b.zarr", keepbits=4, **kw),
                             log=messages.append)
    h = "blocks.1.hook_resid_post"
    assert np.array_equal(lossy.group[h][:], bitround(lossless.group[h][:], 4, 10))
    summary = lossy.meta["summary"]
    stored = sum(f.stat().st_size for f in (tmp_path / "b.zarr" / h).rglob("*") if f.is_file())
    assert summary["bytes_per_token"] == round(stored / 192, 2) and summary["keepbits"] == 4
    assert summary["ratio_to_fp32"] == round(192 * 32 * 4 / stored, 3)
    assert summary["bytes_per_token"] < lossless.meta["summary"]["bytes_per_token"]
    assert summary["world_size"] == 1 and summary["chunks_per_rank"] == [3]
    assert any(f"{summary['bytes_per_token']} bytes/token (blosc-zstd, keepbits 4)" in m
               and f"{summary['ratio_to_fp32']}x smaller than fp32" in m for m in messages)
    with pytest.raises(StoreError, match=r"different settings \(keepbits\)"):
        gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "b.zarr", keepbits=5, **kw), log=quiet)
    with pytest.raises(ValueError, match="--keepbits must be in 0..7 for --dtype bfloat16"):
        gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "c.zarr", keepbits=8, dtype="bfloat16", **kw),
                         log=quiet)


def test_store_rows_are_the_documented_stream(tiny_model_dir, text_dir, tmp_path):
    # 5 chunks of 4 contexts through a shuffle buffer of 7: the store's rows are exactly the first 20 packed
    # contexts mixed as saetool.text.stream documents it, recomputed independently by the oracle of test_stream.
    from tests.text.test_stream import oracle

    store = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "s.zarr", n_chunks=5, shuffle_buffer=7,
                                    seed=11, locations=["residual"], layers=[0]), log=quiet)
    texts = [(text_dir / f"doc{i}.txt").read_text() for i in range(4)]
    tokens, mask = oracle(texts, context_size=16, n_contexts=20, buffer_size=7, seed=11)
    assert np.array_equal(store.group["tokens"][:], tokens)
    assert np.array_equal(store.group["mask"][:], mask.reshape(-1))
    assert store.meta["packing"]["n_text_tokens"] == int(mask.sum()) and store.meta["tokens_complete"]
    assert store.meta["summary"]["tokens_masked_out"] == 20 * 16 - int(mask.sum())
    assert not (tmp_path / "s.zarr" / gen.STATE_FILE).exists()


def test_corpus_ending_before_the_budget_is_stored_whole_with_a_warning(tiny_model_dir, text_dir, tmp_path):
    messages = []
    store = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "s.zarr", n_chunks=1000,
                                    locations=["residual"], layers=[0]), log=messages.append)
    n = (sum(N_WORDS // 4 + 7 * i for i in range(4)) + 3) // 15  # every context the text fills
    assert store.complete and store.spec.n_rows == n * 16 and store.spec.n_chunks == -(-n // 4)
    assert (f"warning: the corpus ended after {n} contexts ({n * 16} tokens), fewer than the 4000 asked for "
            f"(--n_chunks 1000 x 4); storing {n * 16} tokens") in messages
    everything = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "all.zarr", shuffle_buffer=4000,
                                         locations=["residual"], layers=[0]), log=quiet)
    assert np.array_equal(store.group["tokens"][:], everything.group["tokens"][:])  # same budget in effect


def test_interrupted_tokens_resume_from_the_saved_state(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    import saetool.text.stream as st

    kw = {"n_chunks": 6, "shuffle_buffer": 5, "locations": ["residual"], "layers": [0]}
    monkeypatch.setattr(st, "TOKENIZE_DOCS", 1)  # one document per tokenisation batch
    clean = gen.run_generate(config(tiny_model_dir, text_dir, tmp_path / "clean.zarr", **kw), log=quiet)
    monkeypatch.setattr(gen, "STATE_SECONDS", 0.0)  # save the stream state after every chunk
    original = ActivationStore.write_tokens
    calls = {"n": 0}

    def crashing(self, chunk, tokens, mask):
        if calls["n"] == 3:
            self.group["tokens"][4 * chunk] = 7  # a partial write of chunk 3
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return original(self, chunk, tokens, mask)

    cfg = config(tiny_model_dir, text_dir, tmp_path / "s.zarr", **kw)
    monkeypatch.setattr(ActivationStore, "write_tokens", crashing)
    fail = ActivationStore.fail_tokens  # the recording thread sees the failure in the store before the writer ends:
    monkeypatch.setattr(ActivationStore, "fail_tokens", lambda self, e: fail(self, e) or time.sleep(1))
    with pytest.raises(KeyboardInterrupt):  # rank 0 still raises the writer's own error
        gen.run_generate(cfg, log=quiet)
    assert (tmp_path / "s.zarr" / gen.STATE_FILE).exists()
    with pytest.raises(StoreError, match=r"incomplete \([0-3]/6 chunks committed\)"):  # recorded while tokenising
        ActivationStore.open(tmp_path / "s.zarr")
    assert "KeyboardInterrupt: killed" in ActivationStore.open(tmp_path / "s.zarr", False).meta["token_writer"]["error"]
    monkeypatch.setattr(ActivationStore, "write_tokens", original)
    tokenised = []
    encode = st.encode_texts
    monkeypatch.setattr(st, "encode_texts", lambda tok, batch: tokenised.extend(batch) or encode(tok, batch))
    messages = []
    resumed = gen.run_generate(cfg, log=messages.append)
    # chunks 0-2 (12 contexts of 15 text tokens) came from documents 0 and 1 (300 and 307 words): only
    # the documents after the saved state are tokenised again
    assert f"resuming the tokens of {tmp_path / 's.zarr'} at chunk 3 (1 documents already tokenised)" in messages
    texts = [(text_dir / f"doc{i}.txt").read_text() for i in range(4)]
    assert tokenised == texts[1:2]
    for name in [*clean.spec.hook_names, "tokens", "mask", "commits"]:
        assert np.array_equal(resumed.group[name][:], clean.group[name][:]), name
    assert resumed.meta["packing"] == clean.meta["packing"]


def test_a_long_document_is_stored_as_whole_document_tokenisation_and_resumes_inside(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    # A 3,000-word document among short ones, read in pieces of ~200 characters (saetool.text.pieces): the store
    # equals the oracle of whole-document tokenisation; a run killed while the long document is open resumes from the
    # stream state saved at a seam inside it and writes the same store.
    import saetool.text.stream as st
    from tests.text.test_stream import oracle

    rng = np.random.default_rng(5)
    d = tmp_path / "text"
    d.mkdir()
    texts = [" ".join(rng.choice(WORDS, n)) for n in (40, 3000, 25)]
    for i, t in enumerate(texts):
        (d / f"doc{i}.txt").write_text(t)
    for name, value in (("LONG_DOCUMENT_CHARS", 1000), ("PIECE_CHARS", 200), ("SEAM_CONTEXT_CHARS", 16)):
        monkeypatch.setattr(st, name, value)
    kw = {"n_chunks": 40, "shuffle_buffer": 5, "locations": ["residual"], "layers": [0]}
    clean = gen.run_generate(config(tiny_model_dir, d, tmp_path / "clean.zarr", **kw), log=quiet)
    tokens, mask = oracle(texts, context_size=16, n_contexts=160, buffer_size=5, seed=0)
    assert np.array_equal(clean.group["tokens"][:], tokens) and np.array_equal(clean.group["mask"][:], mask.reshape(-1))
    monkeypatch.setattr(gen, "STATE_SECONDS", 0.0)  # save the stream state after every chunk
    interrupt_on_call(monkeypatch, ActivationStore, "write_tokens", 20)
    cfg = config(tiny_model_dir, d, tmp_path / "s.zarr", **kw)
    with pytest.raises(KeyboardInterrupt):
        gen.run_generate(cfg, log=quiet)
    with np.load(tmp_path / "s.zarr" / gen.STATE_FILE) as state:
        assert int(state["document_open"]) == 1 and (chars := int(state["document_chars"])) > 0
    monkeypatch.undo()
    for name, value in (("LONG_DOCUMENT_CHARS", 1000), ("PIECE_CHARS", 200), ("SEAM_CONTEXT_CHARS", 16)):
        monkeypatch.setattr(st, name, value)
    messages = []
    resumed = gen.run_generate(cfg, log=messages.append)
    assert any(m.endswith(f"(1 documents already tokenised, and {chars} characters of the next)") for m in messages)
    for name in ["tokens", "mask", "blocks.0.hook_resid_post", "commits"]:
        assert np.array_equal(resumed.group[name][:], clean.group[name][:]), name


def test_bad_text_sources_fail_before_the_store_exists(tiny_model_dir, tmp_path, monkeypatch):
    import datasets

    (tmp_path / "d.jsonl").write_text('{"body": "the cat"}\n')
    with pytest.raises(ValueError, match=r"text column 'text' not found; available columns: \['body'\]"):
        gen.run_generate(config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "a.zarr"), log=quiet)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"^dataset 'someone/corpus' is neither .* nor a loadable hub dataset "
                                         r"\(ConnectionError: Couldn't reach"):
        gen.run_generate(config(tiny_model_dir, "someone/corpus", tmp_path / "b.zarr"), log=quiet)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
