"""The sweep report end to end (tiny random Llama -> store -> sweep -> report), the Pareto front, the CLI command,
the HTML page in headless Chromium (when installed), and the run loggers (W&B in offline mode)."""

import base64
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import saetool.generate as gen
from saetool.cli import main
from saetool.config import GenerateConfig, SweepConfig
from saetool.evaluate.spliced import evaluate_spliced, heldout_contexts
from saetool.report.sweep_report import pareto_front, write_report
from saetool.saved.folders import load_sweep, read_index
from saetool.store.activation_store import ActivationStore
from saetool.sweep.driver import run_sweep
from saetool.train.wandb_log import PlainLogger, WandbLogger, make_logger
from tests.helpers import WORDS
from tests.synthetic import write_store

PNG = b"\x89PNG\r\n\x1a\n"


def quiet(*a):
    pass


def test_pareto_front():
    # (1,4) (2,3) (3,3.5) (4,1) (2,3) again: (3,3.5) is dominated by (2,3); equal points do not dominate each other
    assert pareto_front([1, 2, 3, 4, 2], [4, 3, 3.5, 1, 3]) == [True, True, False, True, True]
    assert pareto_front([1, 2, float("nan")], [2, 1, 0]) == [True, True, False]
    assert pareto_front([1, 1], [1, 2]) == [True, False]


@pytest.fixture(scope="module")
def sweep_dir(tiny_model_dir, tmp_path_factory):
    """A store of the tiny Llama's blocks.0.hook_resid_post (32 contexts of 16) and a 3-member sweep on it."""
    root = tmp_path_factory.mktemp("report")
    text = root / "text"
    text.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        (text / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, 200)))
    gen.run_generate(GenerateConfig(model=str(tiny_model_dir), dataset=str(text), locations=["residual"], layers=[0],
                                    context_size=16, chunk_size=128, n_chunks=4, batch_size=8, device="cpu",
                                    dtype="float32", dataset_folder=str(root / "s.zarr")), log=quiet)
    run_sweep(SweepConfig(dataset_dir=str(root / "s.zarr"), output_dir=str(root / "sweep"), batch_size=32,
                          eval_tokens=128, l1_values=[1e-3, 1e-2, 1e-1], ratio=2, adam_lr=1e-2, n_repetitions=2,
                          device="cpu"), log=quiet)
    return root / "sweep"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.srcs, self.rows = [], [], []  # rows: per table

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "table":
            self.rows.append(0)
        if tag == "tr":
            self.rows[-1] += 1


def test_report_end_to_end(sweep_dir, tiny_model):
    lines = []
    page = write_report(sweep_dir, model=tiny_model, device="cpu", batch_size=3, log=lines.append)
    folder = sweep_dir / "report"
    assert page == folder / "index.html" and lines[-1] == f"report: {page}"
    ev = json.loads((folder / "evaluation.json").read_text())
    index = read_index(sweep_dir)
    assert [m["path"] for m in ev["members"]] == [e["path"] for e in index["members"]]

    # the held-out metrics are the sweep's own (same rows, same definitions)
    for m, e in zip(ev["members"], index["members"]):
        for k in ("fvu", "l0", "mse", "dead_fraction"):
            assert m["heldout"][k] == pytest.approx(e["metrics"][k], rel=1e-5, abs=1e-9), k
        assert m["heldout"]["n_tokens"] == e["metrics"]["n_tokens"]
        assert sum(m["histogram"]["counts"]) + m["density"]["n_dead"] == m["d_sae"]
        assert m["decoder_norms"]["min"] == pytest.approx(1, abs=1e-5)  # saetool keeps unit atoms
    # the spliced numbers are those of evaluate_spliced on the held-out contexts (8 contexts = the last 128 rows)
    store = ActivationStore.open(index["store"]["path"])
    tokens, mask = heldout_contexts(store, 128)
    assert ev["baselines"]["n_contexts"] == len(tokens) == 8
    saes = list(load_sweep(sweep_dir).values())
    direct = evaluate_spliced(tiny_model, saes, tokens, mask, batch_size=8)
    for m, d in zip(ev["members"], direct):
        for k in ("clean_ce", "spliced_ce", "zero_ablation_ce", "kl", "n_tokens"):
            assert m["spliced"][k] == pytest.approx(d[k], rel=1e-6), k
        assert math.isfinite(m["spliced"]["ce_loss_recovered"])
    # exactly one front point at the lowest L0 at least
    l0 = [m["heldout"]["l0"] for m in ev["members"]]
    assert ev["members"][int(np.argmin(l0))]["pareto_fvu"]
    mmcs = np.asarray(ev["mmcs"])
    assert mmcs.shape == (3, 3) and np.all(np.diag(mmcs) == 1)

    # PNGs and the self-contained page
    for name in ("l0_fvu.png", "l0_ce_recovered.png", "density.png", "mmcs.png"):
        assert (folder / name).read_bytes()[:8] == PNG, name
    text = page.read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(text)
    assert len(parser.srcs) == 4
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert parser.rows[1] == 1 + 3  # the facts table, then the member table: a header and one row per member
    assert "link" not in parser.tags and "http://" not in text and "https://" not in text
    for m in ev["members"]:
        assert m["name"] in text


def test_report_without_model_or_heldout_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    store = write_store(tmp_path / "s.zarr", torch.randn(256, 4, generator=g), context_size=16, chunk_size=64)
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "a"), batch_size=32, eval_tokens=64,
                          l1_values=[1e-3, 1e-1], ratio=2, device="cpu"), log=quiet)
    lines = []
    page = write_report(tmp_path / "a", device="cpu", log=lines.append)  # the store's model "synthetic" cannot load
    assert any("spliced evaluation skipped" in line for line in lines)
    ev = json.loads((tmp_path / "a" / "report" / "evaluation.json").read_text())
    assert ev["baselines"] is None and all(m["spliced"] is None for m in ev["members"])
    assert not (tmp_path / "a" / "report" / "l0_ce_recovered.png").exists()
    assert page.read_text().count("data:image/png;base64,") == 3
    # no held-out rows at all: decoder norms and MMCS only
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "b"), batch_size=32, eval_tokens=0,
                          l1_values=[1e-3, 1e-1], ratio=2, device="cpu"), log=quiet)
    page = write_report(tmp_path / "b", model="none", device="cpu", log=quiet)
    ev = json.loads((tmp_path / "b" / "report" / "evaluation.json").read_text())
    assert all(m["heldout"] is None for m in ev["members"]) and len(ev["mmcs"]) == 2
    assert page.read_text().count("data:image/png;base64,") == 1  # the MMCS heatmap


def test_cli_report(tmp_path, capsys):
    store = write_store(tmp_path / "s.zarr", torch.randn(128, 4), context_size=16, chunk_size=64)
    run_sweep(SweepConfig(dataset_dir=str(store.path), output_dir=str(tmp_path / "a"), batch_size=32, eval_tokens=32,
                          l1_values=[1e-3], ratio=2, device="cpu"), log=quiet)
    main(["report", str(tmp_path / "a"), "--model", "none", "--device", "cpu"])
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "a" / "report" / "index.html"))
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "a"), "--batch_size", "0"])
    assert e.value.code == 2 and "--batch_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nothing")])
    assert "is not a finished sweep" in capsys.readouterr().err


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); see docs/report.md for the manual check")
def test_report_page_opens_in_headless_chromium(sweep_dir, tiny_model, tmp_path):
    page = write_report(sweep_dir, model=tiny_model, device="cpu", log=quiet)
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "<h1>Sweep report</h1>" in run.stdout
    assert 'data-broken-images="0"' in run.stdout  # set by the page's load handler: every image decoded


# ------------------------------------------------------------------------------------------------------------------
# logging
# ------------------------------------------------------------------------------------------------------------------


def test_plain_logger_lines():
    lines = []
    log = make_logger(["a", "b"], log=lines.append)
    assert type(log) is PlainLogger
    log.log_train(20, 2048, {"loss": torch.tensor([0.5, 0.25]), "l0": torch.tensor([12.0, 3.0])},
                  firing_frequency=torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
    log.log_eval([{"fvu": 0.125, "note": "x"}, {"fvu": 0.5}])
    log.finish()
    assert lines == ["train: step 20, tokens 2048, loss 0.25..0.5, l0 3..12, dead 50.0..100.0%",
                     "eval a: fvu 0.125", "eval b: fvu 0.5"]


def test_wandb_logger_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = WandbLogger(["l1_1e-3", "l1_1e-2"], project="saetool-test", config={"ratio": 2}, mode="offline",
                      dir=str(tmp_path))
    log.log_train(1, 64, {"loss": torch.tensor([0.5, 0.25]), "l0": torch.tensor([12.0, 3.0])},
                  firing_frequency=torch.tensor([[0.0, 0.5, 0.25], [0.0, 0.0, 1.0]]))
    log.log_eval([{"fvu": 0.1}, {"fvu": 0.2}])
    assert log.run.summary["l1_1e-3/eval_fvu"] == 0.1
    log.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
