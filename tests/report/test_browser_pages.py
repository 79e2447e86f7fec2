"""The feature browser in the report: its data equals the collection pass's, the pages load in headless Chromium
(contexts shown, no script error), and the bad inputs of issue 12 give a page that says why."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import saetool.generate as gen
from saetool.config import GenerateConfig, SweepConfig
from saetool.evaluate import encode_pass
from saetool.report.browser.collect import FeatureCollector
from saetool.report.sweep_report import write_report
from saetool.saved.folders import load_sweep, read_index
from saetool.store.activation_store import ActivationStore
from saetool.sweep.driver import run_sweep
from tests.helpers import WORDS
from tests.synthetic import write_store

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def sweep_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama's blocks.0.hook_resid_post (24 contexts of 16 tokens) and a 2-member sweep on it."""
    root = tmp_path_factory.mktemp("browser")
    (root / "text").mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        (root / "text" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, 200)))
    gen.run_generate(GenerateConfig(model=str(tiny_model_dir), dataset=str(root / "text"), locations=["residual"],
                                    layers=[0], context_size=16, chunk_size=128, n_chunks=3, batch_size=8,
                                    device="cpu", dtype="float32", dataset_folder=str(root / "s.zarr")), log=quiet)
    run_sweep(SweepConfig(dataset_dir=str(root / "s.zarr"), output_dir=str(root / "sweep"), batch_size=32,
                          eval_tokens=128, l1_values=[1e-3, 1e-1], ratio=2, adam_lr=1e-2, device="cpu"), log=quiet)
    return root / "sweep"


def read_js(path, prefix):
    text = path.read_text(encoding="utf-8")
    assert text.startswith(prefix) and text.endswith(");\n")
    return json.loads("[" + text[len(prefix):-3] + "]")


def test_browser_data_is_the_collection_of_the_heldout_rows(sweep_dir, tiny_model):
    write_report(sweep_dir, model=tiny_model, device="cpu", log=quiet, browser_top=5, browser_samples=10)
    folder = sweep_dir / "report" / "browser"
    index = read_index(sweep_dir)
    store = ActivationStore.open(index["store"]["path"])
    saes = list(load_sweep(sweep_dir).values())
    col = FeatureCollector([s.d_sae for s in saes], 16, top=5, samples=10, before=12, after=4)
    encode_pass(saes, store, "blocks.0.hook_resid_post", (store.spec.n_rows - 128, store.spec.n_rows), "cpu",
                batch_rows=64, collector=col)  # other batches than the report's: the same result
    tokens = np.asarray(store.group["tokens"][:]).reshape(-1)
    mask = np.asarray(store.group["mask"][:]).astype(int)
    vocab = read_js(folder / "data" / "vocab.js", "saeBrowser.vocab(")[0]
    assert vocab["0"] == "<bos>"
    for m, sae in enumerate(saes):
        res = col.result(m)
        m_list = read_js(folder / "data" / f"m{m}" / "list.js", "saeBrowser.list(")[1]
        assert m_list["fired"] == res["fired"].tolist()
        block = read_js(folder / "data" / f"m{m}" / "b0.js", "saeBrowser.block(")[2]
        assert len(block) == sae.d_sae == 64
        for i, rec in enumerate(block):
            rows = [w["row"] for w in rec["top"]]
            assert rows == [r for r in res["top"]["row"][i].tolist() if r >= 0]
            for w in rec["top"]:  # window tokens are the store's tokens around the row, within its context
                first = w["row"] - w["at"]
                assert w["ids"] == tokens[first:first + len(w["ids"])].tolist()
                assert first // 16 == w["row"] // 16 == (first + len(w["ids"]) - 1) // 16
                assert w["acts"][w["at"]] == w["value"]
                kept = mask[first:first + len(w["ids"])].tolist()  # left out of the page data when all kept
                assert w.get("kept", [1] * len(kept)) == kept and ("kept" in w) == (0 in kept)
                assert all(type(a) is int for a in w["acts"] if a == 0)  # zeros written as 0
            assert sum(len(q["windows"]) for q in rec["quantiles"]) == min(10, rec["fired"])
            if rec["logits"] is not None:
                direct = (sae.W_dec[i] @ tiny_model.W_U).detach()
                assert [t for t, _ in rec["logits"]["pos"]] == torch.argsort(direct, descending=True)[:10].tolist()
    page = (sweep_dir / "report" / "index.html").read_text()
    assert 'href="browser/index.html"' in page and "held-out rows" in page


def dump(url, tmp_path):
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); see docs/report.md for the manual check")
def test_browser_pages_load_in_headless_chromium(sweep_dir, tiny_model, tmp_path):
    write_report(sweep_dir, model=tiny_model, device="cpu", log=quiet, browser_top=5, browser_samples=10)
    folder = sweep_dir / "report" / "browser"
    block = read_js(folder / "data" / "m0" / "b0.js", "saeBrowser.block(")[2]
    first = next(r for r in block if r["top"])
    base = folder.as_uri()
    dom = dump(f"{base}/index.html", tmp_path)
    assert 'data-state="ok"' in dom and 'data-errors="0"' in dom and dom.count('href="member.html#m=') == 2
    dom = dump(f"{base}/member.html#m=0", tmp_path)
    assert 'data-state="ok"' in dom and 'data-errors="0"' in dom
    assert dom.count('href="latent.html#m=0&amp;l=') == 64
    dom = dump(f"{base}/latent.html#m=0&l={first['index']}", tmp_path)
    assert 'data-state="ok"' in dom and 'data-errors="0"' in dom
    top = dom[dom.index('id="top"'):]
    assert top.count('class="ctx"') >= len(first["top"])  # the first latent's contexts are shown
    vocab = read_js(folder / "data" / "vocab.js", "saeBrowser.vocab(")[0]
    w = first["top"][0]
    shown = re.findall(r'<span class="tok at"[^>]*>([^<]*)</span>', top)[0]
    assert shown == vocab[str(w["ids"][w["at"]])]
    assert "<svg" in dom and "<rect" in dom  # the histogram
    dom = dump(f"{base}/latent.html#m=0&l=999", tmp_path)
    assert 'data-state="error"' in dom and "is not among the 64 latents" in dom


def test_browser_bad_inputs_say_why(tmp_path):
    g = torch.Generator().manual_seed(0)
    store = write_store(tmp_path / "s.zarr", torch.randn(256, 4, generator=g), context_size=16, chunk_size=64)
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "a"), batch_size=32, eval_tokens=64,
                          l1_values=[1e-3], ratio=2, device="cpu"), log=quiet)
    lines = []
    write_report(tmp_path / "a", device="cpu", log=lines.append, browser_max_latents=3)
    members = (tmp_path / "a" / "report" / "browser" / "data" / "members.js").read_text()
    # the store's model "synthetic" cannot be loaded: contexts as token ids, no logit effects, said on the pages
    assert "no model loaded: tokens show as ids" in members
    assert "8 latents, more than --browser_max_latents 3: latents 0..2 are shown" in members
    vocab = read_js(tmp_path / "a" / "report" / "browser" / "data" / "vocab.js", "saeBrowser.vocab(")[0]
    assert all(v == f"#{k}" for k, v in vocab.items())
    # no held-out rows: the browser says how to get contexts; --browser_rows takes them from the training rows
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "b"), batch_size=32, eval_tokens=0,
                          l1_values=[1e-3], ratio=2, device="cpu"), log=quiet)
    write_report(tmp_path / "b", model="none", device="cpu", log=lines.append)
    assert lines[-2].startswith("report: feature browser without contexts: the sweep held out no rows")
    write_report(tmp_path / "b", model="none", device="cpu", log=lines.append, browser_rows=64)
    members = (tmp_path / "b" / "report" / "browser" / "data" / "members.js").read_text()
    assert "Contexts from the first 64 rows of the store" in members and '"n_tokens": 64' in members
    write_report(tmp_path / "b", model="none", device="cpu", log=quiet, browser=False)
    assert not (tmp_path / "b" / "report" / "browser").exists()
    assert "browser/index.html" not in (tmp_path / "b" / "report" / "index.html").read_text()


def test_foreign_array_sweep_gets_a_browser_page_saying_why(tmp_path, capsys):
    import zarr

    from saetool.cli import main

    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.create_array("acts", shape=(256, 4), dtype="float32", chunks=(64, 4))[:] = np.random.default_rng(0).standard_normal(
        (256, 4)).astype(np.float32)
    run_sweep(SweepConfig(dataset_dir=str(tmp_path / "other.zarr"), array="acts", output_dir=str(tmp_path / "a"),
                          batch_size=32, eval_tokens=64, l1_values=[1e-3], ratio=2, device="cpu", report=False),
              log=quiet)
    lines = []
    write_report(tmp_path / "a", device="cpu", log=lines.append)
    ev = json.loads((tmp_path / "a" / "report" / "evaluation.json").read_text())
    assert ev["members"][0]["heldout"]["n_tokens"] == 64  # the held-out metrics of the foreign rows
    why = "the sweep read the foreign array 'acts' of"
    assert any(line.startswith(f"report: feature browser without contexts: {why}") for line in lines)
    members = (tmp_path / "a" / "report" / "browser" / "data" / "members.js").read_text()
    assert why in members and '"members": []' in members
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", "neuronpedia", str(tmp_path / "a"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"saetool: error: cannot export to Neuronpedia: {why}")
    assert err.count("\n") == 1 and not (tmp_path / "a" / "export").exists()
