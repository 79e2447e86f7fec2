"""From a sweep's members and store to the browser's data: the collector for the report's pass, then token ids,
token strings and logit effects, and the pages (:func:`saetool.report.browser.pages.write_browser`).

Which rows: by default the held-out rows the report evaluates (one encode serves both, see
:func:`saetool.report.browser.collect.encode_pass`); with ``browser_rows N`` the first N rows of the store (training rows,
a separate pass). What cannot be shown is said on the pages, never left as a broken page: a store without token ids
(a sweep on a foreign ``--array``) gets an index page that says so; a model that cannot be loaded gives contexts
as token ids (``#123``) and no logit effects; latents beyond ``browser_max_latents`` are not collected.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from saetool.evaluate import encode_pass
from saetool.report.browser.collect import FeatureCollector
from saetool.report.browser.logits import logit_effects, logit_effects_reason, token_strings
from saetool.report.browser.pages import BROWSER_DIR, write_browser
from saetool.report.browser.records import read_window_tokens

__all__ = ["browser_blocker", "collect_results", "make_collector", "write_member_browser"]


def browser_blocker(store) -> str | None:
    """Why no context can be shown for ``store`` (None: it can)."""
    if store is None:
        return "the sweep's activation store is not available (moved or deleted; pass --dataset_dir)"
    if getattr(store, "group", None) is None or "tokens" not in store.group:
        name = store.spec.hook_names[0]
        return (f"the sweep read the foreign array {name!r} of {store.path} (--array), which has no token ids; "
                "the browser needs a saetool store (saetool generate)")
    return None


def make_collector(cfg, saes, store, device) -> FeatureCollector:
    """A :class:`FeatureCollector` for ``saes`` with the report's ``browser_*`` settings."""
    return FeatureCollector([s.d_sae for s in saes], store.spec.context_size, top=cfg.browser_top,
                            samples=cfg.browser_samples, before=cfg.browser_before, after=cfg.browser_after,
                            n_latents=cfg.browser_max_latents, device=device)


def collect_results(collector: FeatureCollector, store, n_members: int) -> list[dict]:
    """Each member's :meth:`FeatureCollector.result` with the windows' token ids and mask (``ids``, ``kept``) and
    ``before``."""
    out = []
    for m in range(n_members):
        res = collector.result(m)
        for name in ("top", "samples"):
            res[name]["ids"], res[name]["kept"] = read_window_tokens(store, res[name]["window_row"])
        res["before"] = collector.before
        out.append(res)
    return out


def _d_model(model) -> int | None:
    return None if model is None else int(model.W_U.shape[0])


def member_logits(cfg, sae, hook: str, model, n: int) -> tuple[dict | None, str | None]:
    """``(logit_effects of the first n latents, None)`` or ``(None, why not)``."""
    if sae.transcoder:  # a transcoder's decoder writes into its output hook
        hook = (sae.cfg.get("metadata") or {}).get("hook_name_out") or hook
    reason = logit_effects_reason(hook, sae.d_out, _d_model(model))
    if reason is not None or cfg.browser_logits == 0:
        return None, reason
    return logit_effects(sae.W_dec[:n], model.W_U, k=cfg.browser_logits), None


def write_member_browser(report_dir: Path, cfg, saes, labels: list[str], results: list[dict], hook: str, model,
                         source: str, notes: list[str]) -> Path:
    """Token strings, logit effects and the pages for the collected ``results`` (one per SAE)."""
    members, ids = [], set()
    tokenizer = getattr(model, "tokenizer", None)
    if model is None:
        notes = [*notes, "no model loaded: tokens show as ids (#123) and there are no logit effects"]
    for sae, label, res in zip(saes, labels, results):
        n = len(res["density"])
        logits, why = member_logits(cfg, sae, hook, model, n)
        member_notes = [f"logit effects not shown: {why}"] if why and model is not None else []
        if n < sae.d_sae:
            member_notes.append(f"{sae.d_sae} latents, more than --browser_max_latents {cfg.browser_max_latents}: "
                                f"latents 0..{n - 1} are shown")
        for name in ("top", "samples"):
            ids.update(np.unique(res[name]["ids"]).tolist())
        if logits is not None:
            ids.update(np.unique(logits["top_ids"]).tolist())
            ids.update(np.unique(logits["bottom_ids"]).tolist())
        members.append({"label": label, "d_sae": sae.d_sae, "notes": member_notes, "result": res, "logits": logits})
    vocab = token_strings(tokenizer, list(ids))
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    return write_browser(report_dir, members, vocab, special, source, notes)


def remove_browser(report_dir: Path) -> None:
    """Delete ``report_dir/browser/`` (a report written with ``--browser False``)."""
    shutil.rmtree(Path(report_dir) / BROWSER_DIR, ignore_errors=True)


def write_blocked_browser(report_dir: Path, why: str) -> Path:
    """The browser's index page when no context can be shown: it says why (no member pages)."""
    return write_browser(report_dir, [], {}, [], "no contexts", [f"no feature browser: {why}"])


def run_browser(cfg, ev, report_dir: Path, labels: list[str], load_model, log) -> str:
    """Write ``report_dir/browser/`` for the report (see the module docstring); returns the line index.html shows.

    Args:
        cfg: the :class:`saetool.config.ReportConfig`.
        ev: the report's :class:`saetool.report.sweep_report.SweepEvaluation`: its ``store``, ``saes``, ``hook``,
            ``heldout`` pass (rows and the collector it filled, or None), ``model`` and ``model_tried``.
        labels: one label per member; load_model: a callable returning the model or None (called only when
            loading was not tried yet); log: progress lines.
    """
    store, saes, hook = ev.store, ev.saes, ev.hook
    why = browser_blocker(store)
    collector = ev.heldout.collector if ev.heldout is not None else None
    rows = ev.heldout.rows if ev.heldout is not None else None
    if why is None and cfg.browser_rows is not None:
        rows = (0, min(int(cfg.browser_rows), store.spec.n_rows))
        collector = make_collector(cfg, saes, store, cfg.device)
        encode_pass(saes, store, hook, rows, cfg.device, collector=collector)
        source = f"Contexts from the first {rows[1]} rows of the store (training rows, --browser_rows)."
    elif why is None and collector is None:
        why = "the sweep held out no rows (eval_tokens 0); pass --browser_rows N to show contexts from training rows"
    else:
        source = f"Contexts from the held-out rows {rows[0]}..{rows[1]} of {store.path if store else ''} " \
                 "(never trained on)."
    if why is not None:
        write_blocked_browser(report_dir, why)
        log(f"report: feature browser without contexts: {why}")
        return f"no contexts: {why}"
    model = ev.model if ev.model_tried else load_model()
    results = collect_results(collector, store, len(saes))
    page = write_member_browser(report_dir, cfg, saes, labels, results, hook, model, source, [])
    log(f"report: feature browser {page}")
    return source
