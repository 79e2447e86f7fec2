"""JSON-ready records of latents: the collected windows with their token ids, quantile groups, histograms and logit
tables, as the browser pages and the Neuronpedia export read them.

A window is ``{"row": store row of the position, "value": activation there, "at": the position's index in the
window, "ids": token ids, "acts": activations per token, "kept": 0/1 per token}`` (0: a BOS/separator/padding
position the store masks out: never encoded, activation 0). Activations are rounded to 4 significant digits.
"""

from __future__ import annotations

import numpy as np

from saetool.report.browser.collect import quantile_groups

__all__ = ["latent_record", "read_window_tokens", "round4"]


def round4(v: float) -> float:
    """``v`` rounded to 4 significant digits (a Python float; 0 stays 0)."""
    return float(f"{float(v):.4g}")


def read_window_tokens(store, window_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask at the store rows ``window_rows`` (any shape, -1 = none).

    Returns ``(ids, kept)``: int64 ids (-1 where none) and bool store mask (False where none) of the same shape.
    Reads only the contexts referenced, once each, from the store's ``tokens`` array [n_contexts, context_size]
    and the mask at those rows.
    """
    c = store.spec.context_size
    shape = np.shape(window_rows)
    flat = np.asarray(window_rows).reshape(-1)
    ids, kept = np.full(flat.shape, -1, dtype=np.int64), np.zeros(flat.shape, dtype=bool)
    valid = flat >= 0
    if valid.any():
        contexts, inverse = np.unique(flat[valid] // c, return_inverse=True)
        tokens = np.asarray(store.group["tokens"].get_orthogonal_selection((contexts, slice(None))))
        ids[valid] = tokens[inverse, flat[valid] % c]
        rows, inverse = np.unique(flat[valid], return_inverse=True)
        kept[valid] = np.asarray(store.group["mask"].get_orthogonal_selection(rows)).astype(bool)[inverse]
    return ids.reshape(shape), kept.reshape(shape)


def _window(buf: dict, i: int, k: int, before: int) -> dict:
    rows = buf["window_row"][i, k]
    inside = np.nonzero(rows >= 0)[0]
    lo, hi = int(inside[0]), int(inside[-1]) + 1
    return {"row": int(buf["row"][i, k]), "value": round4(buf["value"][i, k]), "at": before - lo,
            "ids": buf["ids"][i, k, lo:hi].tolist(), "acts": [round4(v) for v in buf["window"][i, k, lo:hi]],
            "kept": buf["kept"][i, k, lo:hi].astype(int).tolist()}


def latent_record(res: dict, i: int, before: int, logits: dict | None, n_groups: int = 5) -> dict:
    """The record of latent ``i`` of one member.

    Args:
        res: :meth:`FeatureCollector.result` of the member with, in ``res["top"]`` and ``res["samples"]``, the
            ``ids`` and ``kept`` arrays of :func:`read_window_tokens` for their ``window_row``.
        before: the collector's window tokens before the position.
        logits: :func:`saetool.report.browser.logits.logit_effects` of the member (None: not applicable).

    Returns:
        ``{"index", "density", "fired", "max", "hist": {"first": first bin, "counts": [...]}, "top": [windows],
        "quantiles": [{"low", "high", "n", "windows"}], "logits": {"pos": [[id, value]...], "neg": [...]} or None}``.
        ``hist`` bins are those of :data:`HIST_EDGES` (bin ``b`` covers ``[HIST_EDGES[b-1], HIST_EDGES[b])`` in
        log10, bin 0 everything below, the last bin everything above), trimmed to the non-empty range.
    """
    top, smp = res["top"], res["samples"]
    counts = res["hist"][i]
    nz = np.nonzero(counts)[0]
    hist = {"first": int(nz[0]), "counts": counts[nz[0]:nz[-1] + 1].tolist()} if len(nz) else {"first": 0,
                                                                                               "counts": []}
    rec = {"index": i, "density": float(res["density"][i]), "fired": int(res["fired"][i]),
           "max": round4(res["max_activation"][i]), "hist": hist,
           "top": [_window(top, i, k, before) for k in range(top["row"].shape[1]) if top["row"][i, k] >= 0],
           "quantiles": [], "logits": None}
    for g in quantile_groups(smp["value"][i], smp["row"][i], n_groups):
        g = g[np.argsort(-smp["value"][i][g], kind="stable")]
        rec["quantiles"].append({"low": round4(smp["value"][i, g].min()), "high": round4(smp["value"][i, g].max()),
                                 "windows": [_window(smp, i, int(k), before) for k in g]})
    if logits is not None:
        rec["logits"] = {"pos": [[int(t), round4(v)] for t, v in zip(logits["top_ids"][i], logits["top_values"][i])],
                         "neg": [[int(t), round4(v)] for t, v in zip(logits["bottom_ids"][i],
                                                                     logits["bottom_values"][i])]}
    return rec

