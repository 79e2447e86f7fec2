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
from pathlib import Path

import torch

from saetool.config import ReportConfig
from saetool.evaluate import (
    ReconstructionStats,
    decoder_norm_summary,
    density_summary,
    log10_density_histogram,
    mmcs_matrix,
)
from saetool.report.page import plot_label, write_page
from saetool.saved import load_sae, single_hook_index, write_json

__all__ = ["REPORT_DIR", "evaluate_sweep", "pareto_front", "run_report", "write_report"]

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


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------


def _heldout_stats(saes, store, hook: str, rows: tuple[int, int], device: str, collector=None,
                   target: str | None = None) -> list[dict]:
    """Reconstruction stats of every SAE on the kept rows ``rows`` (transcoders, target: their output hook, scored
    on their prediction of it); the same encode feeds the browser's collector."""
    from saetool.report.browser.collect import encode_pass

    stats = [ReconstructionStats(1, s.d_out, s.d_sae, device=device) for s in saes]
    encode_pass(saes, store, hook, rows, device, stats=stats, collector=collector, target=target)
    return [st.compute() if st.n_tokens else None for st in stats]


def _load_model(cfg: ReportConfig, store, log):
    """The model for the spliced evaluation, or None (with a log line) when skipped."""
    from saetool.lm import load_model

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
    from saetool.evaluate import evaluate_spliced, heldout_contexts

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


def evaluate_sweep(cfg: ReportConfig, model=None, log=print, parts: dict | None = None) -> dict:
    """Compute every number of the report for the sweep in ``cfg.output_dir``.

    Args:
        cfg: the report settings (see :class:`ReportConfig`).
        model: an already loaded ``TransformerBridge`` for the spliced evaluation (then ``cfg.model`` is ignored);
            None loads ``cfg.model`` / the store's model.
        log: callable for progress lines.
        parts: a dict to fill with what was loaded and collected, for the browser: ``store``, ``saes``, ``hook``,
            ``rows`` (held-out rows or None), ``model`` (or None) and ``collector`` (with ``cfg.browser``, a store
            with token ids and held-out rows: filled in the same pass as the held-out metrics; else None).

    Returns:
        A JSON-ready dict: ``sweep`` (facts about the run), ``baselines`` (clean / zero / mean-ablation CE and
        KL, or None), ``members`` (one dict per member, index order: name, path, architecture, hyperparameters,
        ``sweep_value``, ``heldout`` reconstruction metrics, ``density`` summary, ``histogram`` {counts, edges},
        ``decoder_norms`` {min, mean, max}, ``spliced`` metrics or None, ``pareto_fvu``, ``pareto_ce``), and
        ``mmcs`` (the [M, M] matrix as nested lists; ``[i][j]`` = how well member i covers member j's atoms).
    """
    from saetool.store import ActivationStore

    out_dir = Path(cfg.output_dir)
    index = single_hook_index(out_dir, "saetool report")
    sweep_param = index.get("sweep_param", "l1_coefficient")
    entries = index["members"]
    saes = [load_sae(out_dir / e["path"], device=cfg.device, dtype="float32") for e in entries]
    hook = saes[0].cfg.get("hook_name") or index.get("store", {}).get("hook_name")
    target = (saes[0].cfg.get("metadata") or {}).get("hook_name_out") if saes[0].transcoder else None
    eval_tokens = int(index.get("config", {}).get("eval_tokens", 0) or 0)
    store_path = cfg.dataset_dir or index.get("store", {}).get("path")
    array = index.get("config", {}).get("array")
    store = ActivationStore.open(store_path, array=array) if store_path else None
    collector = None
    if cfg.browser and cfg.browser_rows is None and store is not None and eval_tokens > 0:
        from saetool.report.browser.build import browser_blocker, make_collector

        if browser_blocker(store) is None:
            collector = make_collector(cfg, saes, store, cfg.device)

    t0 = time.perf_counter()
    heldout = [None] * len(saes)
    rows = None
    if store is not None and eval_tokens > 0:
        n = store.spec.n_rows
        rows = (n - eval_tokens, n)
        heldout = _heldout_stats(saes, store, hook, rows, cfg.device, collector, target=target)
    spliced, baselines, n_contexts = [None] * len(saes), None, 0
    tried = model is not None
    if store is not None and eval_tokens > 0 and array is None:
        if model is None:
            model, tried = _load_model(cfg, store, log), True
        if model is not None:
            spliced, baselines, n_contexts = _spliced(cfg, model, saes, store, target or hook, eval_tokens, log)
    members = [_member_record(e, sae, h, sp, cfg.dense_threshold)
               for e, sae, h, sp in zip(entries, saes, heldout, spliced)]
    l0 = [m["heldout"]["l0"] if m["heldout"] else float("nan") for m in members]
    fvu = [m["heldout"]["fvu"] if m["heldout"] else float("nan") for m in members]
    ce = [m["spliced"]["ce_loss_recovered"] if m["spliced"] else float("nan") for m in members]
    for m, a, b in zip(members, pareto_front(l0, fvu), pareto_front(l0, [-v for v in ce])):
        m["pareto_fvu"], m["pareto_ce"] = a, b
    mmcs = mmcs_matrix([s.W_dec for s in saes]) if len(saes) > 1 else torch.ones(1, 1, dtype=torch.float64)
    if parts is not None:
        parts.update(store=store, saes=saes, hook=hook, rows=rows, model=model, model_tried=tried, collector=collector)
    spec = store.spec if store is not None else None
    return {
        "sweep": {
            "output_dir": str(out_dir), "sweep_param": sweep_param, "n_members": len(saes),
            "hook_name": hook if target is None else f"{hook} -> {target}",
            "d_in": saes[0].d_in, "d_sae": saes[0].d_sae, "architecture": entries[0]["architecture"],
            "store": str(store_path) if store_path else None, "model": spec.model if spec else None,
            "dataset": spec.dataset if spec else None, "heldout_rows": list(rows) if rows else None,
            "spliced_contexts": n_contexts, "training": index.get("training", {}),
            "saetool_version": index.get("saetool_version"), "seconds": round(time.perf_counter() - t0, 2),
        },
        "baselines": baselines,
        "members": members,
        "mmcs": mmcs.tolist(),
        "dense_threshold": cfg.dense_threshold,
    }


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
    from saetool.config import build

    if isinstance(model, str):  # a model name or "none" is the --model flag
        flags["model"], model = model, None
    cfg = build(ReportConfig, {"output_dir": str(output_dir), **flags})
    return run_report(cfg, model=model, log=log)


def run_report(cfg: ReportConfig, model=None, log=print) -> Path:
    """:func:`write_report` for a built :class:`ReportConfig`."""
    cfg.validate()
    parts: dict = {}
    ev = evaluate_sweep(cfg, model=model, log=log, parts=parts)
    folder = Path(cfg.output_dir) / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    sp = ev["sweep"]["sweep_param"]
    members = ev["members"]
    labels = [plot_label(sp, m["sweep_value"]) for m in members]
    from saetool.report.browser.build import remove_browser, run_browser

    ev["browser"] = None
    if cfg.browser:
        names = [f"{sp} {v}: {m['name']}" for v, m in zip(labels, members)]
        ev["browser"] = run_browser(cfg, parts, folder, names, lambda: _load_model(cfg, parts["store"], log), log)
    else:
        remove_browser(folder)  # a browser of an earlier report would no longer match this one
    write_json(folder / "evaluation.json", ev)
    page = write_page(folder, ev, labels)
    log(f"report: {page}")
    return page
