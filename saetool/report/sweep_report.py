"""The sweep report: held-out metrics of every member, spliced CE/KL, latent statistics, PNG plots and one
self-contained HTML page.

``write_report(output_dir)`` (and ``saetool report OUTPUT_DIR``) reads a finished sweep folder and its activation
store and writes ``<output_dir>/report/``::

    index.html            one page, no external resources: the member table and every plot (PNG, base64-embedded)
    evaluation.json       every number on the page (per member, plus the MMCS matrix and the run's facts)
    l0_fvu.png            L0 against FVU across members, Pareto front marked
    l0_ce_recovered.png   L0 against CE loss recovered (when the spliced evaluation ran), Pareto front marked
    density.png           log10 firing-density histogram of every member (dead latents counted apart)
    mmcs.png              mean max cosine similarity between members' decoders (2+ members)

What is computed, all on the held-out rows the sweep never trained on (the store's last ``eval_tokens`` rows):

* reconstruction metrics with :class:`saetool.evaluate.metrics.ReconstructionStats` over the masked held-out rows (MSE, FVU,
  explained variance, L0, dead fraction), the same definitions as the sweep's table;
* firing density, dead and dense counts, decoder norms and MMCS (:mod:`saetool.evaluate.latent_stats`);
* the spliced evaluation (:func:`saetool.evaluate.spliced.evaluate_spliced`) on the held-out *contexts* (those entirely in
  the held-out rows), with the store's mask; the model is the store's unless given.

Pareto front: a member is on the L0/FVU front when no other member has L0 <= and FVU <= with one of them strictly
smaller (both minimised); on the L0/CE front the same with CE loss recovered maximised.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saetool.config import ReportConfig, build
from saetool.evaluate import (
    HeldOut,
    decoder_norm_summary,
    density_summary,
    evaluate_spliced,
    heldout_contexts,
    heldout_rows,
    heldout_stats,
    log10_density_histogram,
    mmcs_matrix,
)
from saetool.lm import load_model
from saetool.report.browser.build import browser_blocker, make_collector, remove_browser, run_browser
from saetool.report.page import plot_label, write_page
from saetool.saved import load_sae, single_hook_index, write_json
from saetool.store import ActivationStore

__all__ = ["REPORT_DIR", "SweepEvaluation", "evaluate_sweep", "heldout_collector", "pareto_front", "run_report", "write_report"]

REPORT_DIR = "report"




def pareto_front(x, y) -> list[bool]:
    """Which points ``(x[i], y[i])`` are Pareto-optimal when both coordinates are minimised.

    Point i is on the front unless some j has ``x[j] <= x[i]`` and ``y[j] <= y[i]`` with at least one strict
    inequality. Points with a NaN coordinate are never on the front (and never dominate). Returns a list of bools.
    """
    pts = [(float(a), float(b)) for a, b in zip(x, y)]
    out = []
    for i, (xi, yi) in enumerate(pts):
        if math.isnan(xi) or math.isnan(yi):
            out.append(False)
            continue
        dominated = any(
            j != i and not (math.isnan(xj) or math.isnan(yj)) and xj <= xi and yj <= yi and (xj < xi or yj < yi)
            for j, (xj, yj) in enumerate(pts)
        )
        out.append(not dominated)
    return out


@dataclass
class SweepEvaluation:
    """Every number of the report (``to_json()``: evaluation.json) and what the browser reuses.

    Numbers: ``sweep`` (facts about the run), ``baselines`` (clean / zero / mean-ablation CE and KL, or None),
    ``members`` (one dict per member, index order: name, path, architecture, hyperparameters, ``sweep_value``,
    ``heldout`` reconstruction metrics, ``density`` summary, ``histogram`` {counts, edges}, ``decoder_norms``
    {min, mean, max}, ``spliced`` metrics or None, ``pareto_fvu``, ``pareto_ce``), ``mmcs`` (the [M, M] matrix as
    nested lists; ``[i][j]`` = how well member i covers member j's atoms) and ``dense_threshold``.
    Reused by the browser (not in the JSON): the ``store`` (or None), the loaded ``saes``, the ``hook``, the
    held-out ``heldout`` pass (:class:`saetool.evaluate.HeldOut`, whose collector the browser pages are built from;
    None without held-out rows), the ``model`` (or None) and ``model_tried`` (whether loading it was tried).
    """

    sweep: dict
    baselines: dict | None
    members: list[dict]
    mmcs: list[list[float]]
    dense_threshold: float
    store: Any = None
    saes: list = field(default_factory=list)
    hook: str | None = None
    heldout: HeldOut | None = None
    model: Any = None
    model_tried: bool = False

    def to_json(self) -> dict:
        return {"sweep": self.sweep, "baselines": self.baselines, "members": self.members, "mmcs": self.mmcs,
                "dense_threshold": self.dense_threshold}


def _load_model(cfg: ReportConfig, store, log):
    """The model for the spliced evaluation, or None (with a log line) when skipped."""
    if cfg.model is not None and str(cfg.model).lower() == "none":
        return None
    name = cfg.model if cfg.model is not None else store.spec.model
    try:
        return load_model(name, device=cfg.device, dtype=cfg.model_dtype)
    except ValueError as e:
        if cfg.model is not None:
            raise
        log(f"report: spliced evaluation skipped, the store's model {name!r} cannot be loaded ({e})")
        return None


def _spliced(cfg: ReportConfig, model, saes, store, hook: str, eval_tokens: int, log) -> tuple[list, dict, int]:
    """(per-member spliced metrics, baselines, number of contexts) of the SAEs spliced at `hook` (a transcoder's:
    its output hook) on the held-out contexts. The mean-ablation baseline is the mean of the stored activations over
    the kept positions of exactly these contexts (no extra model pass)."""
    tokens, mask = heldout_contexts(store, eval_tokens, cfg.eval_contexts)
    c = store.spec.context_size
    first = -(-(store.spec.n_rows - eval_tokens) // c)
    x = store.read_rows(hook, first * c, (first + len(tokens)) * c, torch.float64)
    spliced = evaluate_spliced(model, saes, tokens, mask, hook_name=hook, batch_size=cfg.batch_size,
                               mean=x[mask.reshape(-1)].mean(0), variants_per_forward=cfg.variants_per_forward, log=log)
    baselines = {k: spliced[0][k] for k in ("clean_ce", "zero_ablation_ce", "mean_ablation_ce", "zero_ablation_kl",
                                            "mean_ablation_kl", "clean_perplexity", "n_tokens", "n_contexts")}
    return spliced, baselines, len(tokens)


def _member_record(entry: dict, sae, heldout: dict | None, spliced: dict | None, dense_threshold: float) -> dict:
    """One member's numbers in the report (see evaluate_sweep's Returns)."""
    m = {"name": Path(entry["path"]).name, "path": entry["path"], "architecture": entry["architecture"],
         "hyperparams": {k: sae.cfg[k] for k in sae.arch.HYPERPARAMS}, "sweep_value": sae.cfg[sae.arch.SWEEP_PARAM],
         "d_sae": sae.d_sae, "decoder_norms": decoder_norm_summary(sae.W_dec), "heldout": None, "density": None,
         "histogram": None, "spliced": spliced}
    if heldout is not None:
        m["heldout"] = {k: float(heldout[k][0]) for k in ("mse", "fvu", "explained_variance", "l0", "l1",
                                                           "dead_fraction")} | {"n_tokens": int(heldout["n_tokens"])}
        freq = heldout["firing_frequency"][0]
        m["density"] = density_summary(freq, dense_threshold)
        counts, edges = log10_density_histogram(freq, heldout["n_tokens"])
        m["histogram"] = {"counts": counts.tolist(), "edges": edges.tolist()}
    return m


def heldout_collector(cfg: ReportConfig, saes, store):
    """The browser's collector to fill during the held-out pass (saetool.evaluate.encode_pass), or None: with
    --browser, no --browser_rows and a store whose contexts can be shown."""
    if not cfg.browser or cfg.browser_rows is not None or store is None or browser_blocker(store) is not None:
        return None
    return make_collector(cfg, saes, store, cfg.device)


def evaluate_sweep(cfg: ReportConfig, model=None, log=print, heldout: HeldOut | None = None) -> SweepEvaluation:
    """Compute every number of the report for the sweep in ``cfg.output_dir`` (see :class:`SweepEvaluation`).

    Args:
        cfg: the report settings (see :class:`saetool.config.ReportConfig`).
        model: an already loaded ``TransformerBridge`` for the spliced evaluation (then ``cfg.model`` is ignored);
            None loads ``cfg.model`` / the store's model.
        log: callable for progress lines.
        heldout: the sweep's held-out pass, already run over its saved members in index order (the sweep driver's,
            saetool.evaluate.heldout_stats, with the browser's collector of :func:`heldout_collector`); None runs it
            here. Either way the held-out rows are encoded once.
    """
    out_dir = Path(cfg.output_dir)
    index = single_hook_index(out_dir, "saetool report")
    sweep_param = index.get("sweep_param", "l1_coefficient")
    entries = index["members"]
    saes = heldout.saes if heldout is not None else [load_sae(out_dir / e["path"], device=cfg.device, dtype="float32")
                                                      for e in entries]
    hook = saes[0].cfg.get("hook_name") or index.get("store", {}).get("hook_name")
    target = (saes[0].cfg.get("metadata") or {}).get("hook_name_out") if saes[0].transcoder else None
    eval_tokens = int(index.get("config", {}).get("eval_tokens", 0) or 0)
    store_path = cfg.dataset_dir or index.get("store", {}).get("path")
    array = index.get("config", {}).get("array")
    store = ActivationStore.open(store_path, array=array) if store_path else None

    t0 = time.perf_counter()
    if heldout is None and store is not None and eval_tokens > 0:
        rows = heldout_rows(store.spec.n_rows, store.spec.context_size, eval_tokens)
        heldout = heldout_stats(saes, store, hook, rows, cfg.device, heldout_collector(cfg, saes, store), target)
    stats = heldout.stats if heldout is not None else [None] * len(saes)
    spliced, baselines, n_contexts = [None] * len(saes), None, 0
    tried = model is not None
    if store is not None and eval_tokens > 0 and array is None:
        if model is None:
            model, tried = _load_model(cfg, store, log), True
        if model is not None:
            spliced, baselines, n_contexts = _spliced(cfg, model, saes, store, target or hook, eval_tokens, log)
    members = [_member_record(e, sae, h, sp, cfg.dense_threshold)
               for e, sae, h, sp in zip(entries, saes, stats, spliced)]
    l0 = [m["heldout"]["l0"] if m["heldout"] else float("nan") for m in members]
    fvu = [m["heldout"]["fvu"] if m["heldout"] else float("nan") for m in members]
    ce = [m["spliced"]["ce_loss_recovered"] if m["spliced"] else float("nan") for m in members]
    for m, a, b in zip(members, pareto_front(l0, fvu), pareto_front(l0, [-v for v in ce])):
        m["pareto_fvu"], m["pareto_ce"] = a, b
    mmcs = mmcs_matrix([s.W_dec for s in saes]) if len(saes) > 1 else torch.ones(1, 1, dtype=torch.float64)
    spec = store.spec if store is not None else None
    rows = heldout.rows if heldout is not None else None
    facts = {
        "output_dir": str(out_dir), "sweep_param": sweep_param, "n_members": len(saes),
        "hook_name": hook if target is None else f"{hook} -> {target}",
        "d_in": saes[0].d_in, "d_sae": saes[0].d_sae, "architecture": entries[0]["architecture"],
        "store": str(store_path) if store_path else None, "model": spec.model if spec else None,
        "dataset": spec.dataset if spec else None, "heldout_rows": list(rows) if rows else None,
        "spliced_contexts": n_contexts, "training": index.get("training", {}),
        "saetool_version": index.get("saetool_version"), "seconds": round(time.perf_counter() - t0, 2),
    }
    return SweepEvaluation(facts, baselines, members, mmcs.tolist(), cfg.dense_threshold, store=store, saes=saes,
                           hook=hook, heldout=heldout, model=model, model_tried=tried)


def write_report(output_dir: str | Path, model=None, log=print, **flags) -> Path:
    """Evaluate the sweep in ``output_dir`` and write ``output_dir/report/`` (see the module docstring).

    Args:
        output_dir: a finished sweep folder.
        model: optional loaded ``TransformerBridge`` for the spliced evaluation (default: load the store's model);
            a string is the ``model`` flag (a name, or "none").
        log: callable for progress lines.
        **flags: other :class:`ReportConfig` fields (``device``, ``eval_contexts``, ``batch_size``, ``model`` as a
            name or "none", ``dataset_dir``, ...).

    Returns:
        The path of ``index.html``.
    """
    if isinstance(model, str):  # a model name or "none" is the --model flag
        flags["model"], model = model, None
    cfg = build(ReportConfig, {"output_dir": str(output_dir), **flags})
    return run_report(cfg, model=model, log=log)


def run_report(cfg: ReportConfig, model=None, log=print, heldout: HeldOut | None = None) -> Path:
    """:func:`write_report` for a built :class:`saetool.config.ReportConfig`; ``heldout`` as in
    :func:`evaluate_sweep` (the sweep driver passes its held-out pass, so the rows are encoded once)."""
    cfg.validate()
    ev = evaluate_sweep(cfg, model=model, log=log, heldout=heldout)
    folder = Path(cfg.output_dir) / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    sp = ev.sweep["sweep_param"]
    labels = [plot_label(sp, m["sweep_value"]) for m in ev.members]
    numbers = ev.to_json()
    numbers["browser"] = None
    if cfg.browser:
        names = [f"{sp} {v}: {m['name']}" for v, m in zip(labels, ev.members)]
        numbers["browser"] = run_browser(cfg, ev, folder, names, lambda: _load_model(cfg, ev.store, log), log)
    else:
        remove_browser(folder)  # a browser of an earlier report would no longer match this one
    write_json(folder / "evaluation.json", numbers)
    page = write_page(folder, numbers, labels)
    log(f"report: {page}")
    return page
