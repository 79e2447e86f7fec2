"""Write the feature browser, ``report/browser/``: static pages that open from disk, data loaded per block.

Layout::

    browser/index.html          the members (links to their latent lists), with the notes of the run
    browser/member.html#m=M     member M's latents: density, max activation, top tokens; search by index or token
    browser/latent.html#m=M&l=L latent L: top-activating contexts (tokens highlighted by activation), quantile
                                samples, activation histogram, logit effects
    browser/app.js, style.css   the pages' script and style (saetool.report.browser.assets)
    browser/data/members.js     facts of every member (label, d_sae, latents shown, notes), histogram edges
    browser/data/vocab.js       the string of every token id the data refers to; the special token ids
    browser/data/mM/list.js     member M's per-latent arrays for the list page
    browser/data/mM/bB.js       the records of latents [B * block_size, (B + 1) * block_size) of member M
                                (:func:`saetool.report.browser.records.latent_record`)

The folder is written under a temporary name and renamed into place whole, so an interrupted write never leaves a
browser that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from saetool.report.browser import assets
from saetool.report.browser.collect import HIST_EDGES
from saetool.report.browser.records import latent_record, round4

__all__ = ["BLOCK_SIZE", "BROWSER_DIR", "write_browser"]

BROWSER_DIR = "browser"
BLOCK_SIZE = 64


def _js_call(path: Path, call: str, *args) -> None:
    body = ",".join(json.dumps(a, separators=(",", ":"), allow_nan=False) for a in args)
    path.write_text(f"saeBrowser.{call}({body});\n", encoding="utf-8")


def _compact(rec: dict) -> dict:
    """A latent record as a page block stores it: a window's ``kept`` is left out when every token is kept (the pages
    read a missing ``kept`` as all 1), zero activations are written as ``0`` and the density to 4 significant digits
    (about a third fewer bytes; the records themselves, which the exports read, are unchanged)."""
    def window(w: dict) -> dict:
        w = {**w, "acts": [a if a else 0 for a in w["acts"]]}
        if all(w["kept"]):
            del w["kept"]
        return w

    return {**rec, "density": round4(rec["density"]), "top": [window(w) for w in rec["top"]],
            "quantiles": [{**q, "windows": [window(w) for w in q["windows"]]} for q in rec["quantiles"]]}


def _list_data(res: dict, n: int, logits: dict | None) -> dict:
    """Per-latent arrays of the list page: density, max, fired, the distinct tokens at the top activations (up to
    5, most frequent first) and the top 3 promoted tokens."""
    tokens = []
    for i in range(n):
        at = [int(res["top"]["ids"][i, k, res["before"]]) for k in range(res["top"]["row"].shape[1])
              if res["top"]["row"][i, k] >= 0]
        ids, counts = np.unique(np.asarray(at, dtype=np.int64), return_counts=True)
        tokens.append([int(t) for t in ids[np.argsort(-counts, kind="stable")][:5]])
    return {"density": [float(f"{d:.4g}") for d in res["density"][:n]], "max": [round4(v) for v in
                                                                                   res["max_activation"][:n]],
            "fired": res["fired"][:n].tolist(), "tokens": tokens,
            "logits": [row[:3] for row in logits["top_ids"][:n].tolist()] if logits is not None else [[]] * n}


def write_browser(report_dir: str | os.PathLike, members: list[dict], vocab: dict[int, str], special: list[int],
                  source: str, notes: list[str]) -> Path:
    """Write ``report_dir/browser/`` (see the module docstring) and return its ``index.html``.

    Args:
        members: per member ``{"label", "d_sae", "notes": [str], "result": FeatureCollector.result with "ids"/"kept"
            in "top" and "samples" and "before" (window tokens before the position), "logits": logit_effects or
            None}``; the latents shown are the collected ones.
        vocab: ``{token id: string}`` for every id in the windows and logit tables; special: the special token ids.
        source: one line saying which rows the contexts come from; notes: lines shown on every page's index.
    """
    report_dir = Path(report_dir)
    final = report_dir / BROWSER_DIR
    tmp = report_dir / (BROWSER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    facts = []
    for m, info in enumerate(members):
        res = info["result"]
        n = len(res["density"])
        folder = tmp / "data" / f"m{m}"
        folder.mkdir()
        _js_call(folder / "list.js", "list", m, _list_data(res, n, info["logits"]))
        for b in range(-(-n // BLOCK_SIZE)):
            recs = [_compact(latent_record(res, i, res["before"], info["logits"]))
                    for i in range(b * BLOCK_SIZE, min(n, (b + 1) * BLOCK_SIZE))]
            _js_call(folder / f"b{b}.js", "block", m, b, recs)
        facts.append({"label": info["label"], "d_sae": info["d_sae"], "n_shown": n, "block_size": BLOCK_SIZE,
                      "n_alive": int((res["fired"] > 0).sum()), "n_tokens": int(res["n_tokens"]),
                      "notes": info["notes"]})
    data = {"members": facts, "hist_edges": [round(float(e), 6) for e in HIST_EDGES], "source": source,
            "notes": notes}
    (tmp / "data" / "members.js").write_text(
        "window.saeBrowser=window.saeBrowser||{};saeBrowser.membersData=" + json.dumps(data, allow_nan=False)
        + ";\n", encoding="utf-8")
    _js_call(tmp / "data" / "vocab.js", "vocab", {str(k): v for k, v in vocab.items()}, sorted(special))
    (tmp / "app.js").write_text(assets.JS, encoding="utf-8")
    (tmp / "style.css").write_text(assets.CSS, encoding="utf-8")
    for name, title in (("index", "saetool feature browser"), ("member", "latents"), ("latent", "latent")):
        (tmp / f"{name}.html").write_text(assets.page(name, title), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final / "index.html"
