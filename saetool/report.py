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

* reconstruction metrics with :class:`saetool.metrics.ReconstructionStats` over the masked held-out rows (MSE, FVU,
  explained variance, L0, dead fraction), the same definitions as the sweep's table;
* firing density, dead and dense counts, decoder norms and MMCS (:mod:`saetool.latent_stats`);
* the spliced evaluation (:func:`saetool.evaluate.evaluate_spliced`) on the held-out *contexts* (those entirely in
  the held-out rows), with the store's mask; the model is the store's unless given.

Pareto front: a member is on the L0/FVU front when no other member has L0 <= and FVU <= with one of them strictly
smaller (both minimised); on the L0/CE front the same with CE loss recovered maximised.
"""

from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saetool.config import _default_device, check_device
from saetool.io import load_sae, single_hook_index, write_json
from saetool.latent_stats import (
    DENSE_THRESHOLD,
    decoder_norm_summary,
    density_summary,
    log10_density_histogram,
    mmcs_matrix,
)
from saetool.metrics import ReconstructionStats

__all__ = ["REPORT_DIR", "ReportConfig", "evaluate_sweep", "pareto_front", "report_help", "run_report", "write_report"]

REPORT_DIR = "report"


@dataclass
class ReportConfig:
    output_dir: str = "sweep_outputs"
    """The finished sweep folder (the one holding sweep.json); the report goes to OUTPUT_DIR/report/."""
    dataset_dir: str | None = None
    """The activation store of the sweep; default: the path recorded in sweep.json."""
    model: str | None = None
    """Model for the spliced CE/KL evaluation: default the store's model (skipped with a note if it cannot be loaded); "none" skips it."""
    eval_contexts: int | None = None
    """Use at most this many held-out contexts in the spliced evaluation (None: all of them)."""
    batch_size: int = 8
    """Contexts per model forward in the spliced evaluation."""
    variants_per_forward: int = 1
    """Spliced variants (ablations, members) stacked into one model forward (1 = one forward each)."""
    device: str = field(default_factory=_default_device)
    """Torch device for the model and the SAEs."""
    model_dtype: str = "float32"
    """dtype the model runs in: float32, bfloat16 or float16."""
    dense_threshold: float = DENSE_THRESHOLD
    """A latent is dense when it fires on more than this fraction of held-out tokens."""
    browser: bool = True
    """Write the feature browser (report/browser/): per member and latent, top contexts, quantile samples, histogram, logit effects."""
    browser_rows: int | None = None
    """Browser contexts from the first N rows of the store (training rows, a separate pass) instead of the held-out rows."""
    browser_top: int = 20
    """Top-activating positions shown per latent."""
    browser_samples: int = 25
    """Random firing positions kept per latent, shown in 5 activation-quantile groups."""
    browser_before: int = 12
    """Context tokens shown before each position."""
    browser_after: int = 4
    """Context tokens shown after each position."""
    browser_max_latents: int = 16384
    """Page budget: latents per member in the browser (a wider member shows its first N, with a note)."""
    browser_logits: int = 10
    """Promoted and suppressed tokens per latent (W_dec @ W_U, residual-stream hooks only; 0: none)."""

    def validate(self) -> None:
        check_device(self.device)
        if self.batch_size < 1:
            raise ValueError("--batch_size must be >= 1")
        if self.variants_per_forward < 1:
            raise ValueError("--variants_per_forward must be >= 1")
        if self.eval_contexts is not None and self.eval_contexts < 1:
            raise ValueError("--eval_contexts must be >= 1 (or None for all)")
        if not 0 <= self.dense_threshold <= 1:
            raise ValueError("--dense_threshold must be in [0, 1]")
        if self.browser_rows is not None and self.browser_rows < 1:
            raise ValueError("--browser_rows must be >= 1 (or None for the held-out rows)")
        for name in ("browser_top", "browser_max_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        for name in ("browser_samples", "browser_before", "browser_after", "browser_logits"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0")


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
    from saetool.browser.collect import encode_pass

    stats = [ReconstructionStats(1, s.d_out, s.d_sae, device=device) for s in saes]
    encode_pass(saes, store, hook, rows, device, stats=stats, collector=collector, target=target)
    return [st.compute() if st.n_tokens else None for st in stats]


def _load_model(cfg: ReportConfig, store, log):
    """The model for the spliced evaluation, or None (with a log line) when skipped."""
    from saetool.models import load_model

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
    from saetool.evaluate import evaluate_spliced, heldout_contexts
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
        from saetool.browser.build import browser_blocker, make_collector

        if browser_blocker(store) is None:
            collector = make_collector(cfg, saes, store, cfg.device)

    t0 = time.perf_counter()
    heldout = [None] * len(saes)
    rows = None
    if store is not None and eval_tokens > 0:
        n = store.spec.n_rows
        rows = (n - eval_tokens, n)
        heldout = _heldout_stats(saes, store, hook, rows, cfg.device, collector, target=target)
    spliced = [None] * len(saes)
    baselines = None
    n_contexts = 0
    tried = model is not None
    if store is not None and eval_tokens > 0 and array is None:
        if model is None:
            model = _load_model(cfg, store, log)
            tried = True
        if model is not None:
            tokens, mask = heldout_contexts(store, eval_tokens, cfg.eval_contexts)
            n_contexts = len(tokens)
            # Mean ablation: the mean of the stored activations over the kept positions of exactly these contexts
            # (no extra model pass).
            c = store.spec.context_size
            first = -(-(store.spec.n_rows - eval_tokens) // c)
            x = store.read_rows(target or hook, first * c, (first + n_contexts) * c, torch.float64)
            mean = x[mask.reshape(-1)].mean(0)
            spliced = evaluate_spliced(model, saes, tokens, mask, hook_name=target or hook, batch_size=cfg.batch_size,
                                       mean=mean,
                                       variants_per_forward=cfg.variants_per_forward, log=log)
            s0 = spliced[0]
            baselines = {k: s0[k] for k in ("clean_ce", "zero_ablation_ce", "mean_ablation_ce", "zero_ablation_kl",
                                            "mean_ablation_kl", "clean_perplexity", "n_tokens", "n_contexts")}
    members = []
    for e, sae, h, sp in zip(entries, saes, heldout, spliced):
        m = {
            "name": Path(e["path"]).name, "path": e["path"], "architecture": e["architecture"],
            "hyperparams": {k: sae.cfg[k] for k in sae.arch.HYPERPARAMS}, "sweep_value": sae.cfg[sae.arch.SWEEP_PARAM],
            "d_sae": sae.d_sae, "decoder_norms": decoder_norm_summary(sae.W_dec), "heldout": None, "density": None,
            "histogram": None, "spliced": sp,
        }
        if h is not None:
            m["heldout"] = {k: float(h[k][0]) for k in ("mse", "fvu", "explained_variance", "l0", "l1",
                                                         "dead_fraction")} | {"n_tokens": int(h["n_tokens"])}
            freq = h["firing_frequency"][0]
            m["density"] = density_summary(freq, cfg.dense_threshold)
            counts, edges = log10_density_histogram(freq, h["n_tokens"])
            m["histogram"] = {"counts": counts.tolist(), "edges": edges.tolist()}
        members.append(m)
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


# ------------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, no display needed)
# ------------------------------------------------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(sweep_param: str, v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _plot_frontier(path: Path, members: list[dict], get_y, ylabel: str, front_key: str, sweep_param: str,
                   title: str) -> bool:
    pts = [(m["heldout"]["l0"], get_y(m), m) for m in members if m["heldout"]]
    pts = [p for p in pts if p[1] is not None and not math.isnan(p[1])]
    if not pts:
        return False
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    ax.scatter(xs, ys, s=36, color="#8a9bb0", label="member", zorder=2)
    front = sorted((p for p in pts if p[2][front_key]), key=lambda p: p[0])
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="#c0392b", ms=7, lw=1.5,
                label="Pareto front", zorder=3)
    for i, (x, y, m) in enumerate(sorted(pts, key=lambda p: p[0])):  # alternate above/below: neighbours overlap
        ax.annotate(_label(sweep_param, m["sweep_value"]), (x, y), textcoords="offset points",
                    xytext=(5, 5) if i % 2 == 0 else (5, -11), fontsize=7, color="#333333")
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def _plot_density(path: Path, members: list[dict], sweep_param: str, dense_threshold: float) -> bool:
    ms = [m for m in members if m["histogram"]]
    if not ms:
        return False
    ncols = min(4, len(ms))
    nrows = -(-len(ms) // ncols)
    fig = _figure(3.0 * ncols, 2.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for ax in axes.flat[len(ms):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, ms):
        edges = np.asarray(m["histogram"]["edges"])
        counts = np.asarray(m["histogram"]["counts"])
        ax.stairs(counts, edges, fill=True, color="#5b8db8")
        ax.axvline(math.log10(dense_threshold), color="#c0392b", lw=0.8, ls="--")
        d = m["density"]
        ax.set_title(f"{sweep_param} {_label(sweep_param, m['sweep_value'])}: {d['n_dead']} dead, {d['n_dense']} dense",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("log10 firing frequency", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("latents", fontsize=8)
    fig.savefig(path)
    return True


def _plot_mmcs(path: Path, matrix: list[list[float]], labels: list[str]) -> bool:
    m = np.asarray(matrix)
    if m.shape[0] < 2:
        return False
    size = 1.6 + 0.55 * m.shape[0]
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("member j (atoms matched)")
    ax.set_ylabel("member i (reference)")
    if m.shape[0] <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("MMCS of decoder atoms", fontsize=10)
    fig.savefig(path)
    return True


# ------------------------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f4f7}td.l{text-align:left;white-space:nowrap}td.n{white-space:nowrap}tr.front td{background:#fdf1ef}
figure{display:inline-block;margin:0.6em 1em 0.6em 0;vertical-align:top}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.8em;color:#555;max-width:640px}dl{font-size:0.85em}dt{font-weight:600}dd{margin:0 0 0.4em 1em}
.facts td{text-align:left}
"""

# Counts images that failed to decode into <body data-broken-images="N"> once the page has loaded, so a headless
# browser (chromium --dump-dom) can check the page.
_SCRIPT = ("window.addEventListener('load',function(){var b=0;for(var i=0;i<document.images.length;i++){"
           "var m=document.images[i];if(!(m.complete&&m.naturalWidth>0))b++;}"
           "document.body.setAttribute('data-broken-images',String(b));});")


def _fmt(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption.split(".")[0])
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html(ev: dict, images: list[tuple[Path, str]]) -> str:
    sw = ev["sweep"]
    p = sw["sweep_param"]
    esc = html.escape
    facts = [("sweep folder", sw["output_dir"]), ("store", sw["store"]), ("model", sw["model"]),
             ("dataset", sw["dataset"]), ("hook", sw["hook_name"]),
             ("SAEs", f"{sw['n_members']} x {sw['architecture']}, d_in {sw['d_in']}, d_sae {sw['d_sae']}"),
             ("held-out rows", "–" if not sw["heldout_rows"] else
              f"{sw['heldout_rows'][0]}..{sw['heldout_rows'][1]} (never trained on)")]
    tr = sw.get("training") or {}
    if tr:
        secs = tr.get("seconds", tr.get("seconds_this_run"))
        facts.append(("training", f"{tr.get('steps')} steps, {tr.get('tokens')} tokens"
                      + (f", {secs} s" if secs is not None else "")))
    b = ev["baselines"]
    if b:
        facts.append(("spliced evaluation", (
            f"{b['n_contexts']} held-out contexts, {b['n_tokens']} scored predictions; clean CE {b['clean_ce']:.4f} "
            f"(perplexity {b['clean_perplexity']:.2f}), zero-ablation CE {b['zero_ablation_ce']:.4f}, "
            f"mean-ablation CE {b['mean_ablation_ce']:.4f}")))
    else:
        facts.append(("spliced evaluation", "not run (no model or no held-out rows)"))
    rows = []
    for m in ev["members"]:
        h, d, s, n = m["heldout"] or {}, m["density"] or {}, m["spliced"] or {}, m["decoder_norms"]
        front = " ".join(x for x, f in (("FVU", m["pareto_fvu"]), ("CE", m["pareto_ce"])) if f)
        cls = ' class="front"' if front else ""
        rows.append(
            f"<tr{cls}><td>{esc(_label(p, m['sweep_value']))}</td><td>{_fmt(h.get('l0'), '.1f')}</td>"
            f"<td>{_fmt(h.get('fvu'), '.4f')}</td><td>{_fmt(h.get('explained_variance'), '.4f')}</td>"
            f"<td>{_fmt(h.get('mse'))}</td><td>{_fmt(d.get('n_dead'), 'd')}</td><td>{_fmt(d.get('n_dense'), 'd')}</td>"
            f"<td class=\"n\">{_fmt(n['mean'], '.4f')} ({_fmt(n['min'], '.3f')}–{_fmt(n['max'], '.3f')})</td>"
            f"<td>{_fmt(s.get('spliced_ce'), '.4f')}</td><td>{_fmt(s.get('ce_delta'), '.4f')}</td>"
            f"<td>{_fmt(s.get('ce_loss_recovered'), '.4f')}</td><td>{_fmt(s.get('kl'), '.4g')}</td>"
            f"<td class=\"l\">{esc(front)}</td><td class=\"l\">{esc(m['name'])}</td></tr>")
    head = ("<tr><th>" + esc(p) + "</th><th>L0</th><th>FVU</th><th>expl. var.</th><th>MSE</th><th>dead</th>"
            "<th>dense</th><th>decoder norm mean (min–max)</th><th>spliced CE</th><th>ΔCE</th><th>CE recovered</th>"
            "<th>KL</th><th>Pareto</th><th class=\"l\">folder</th></tr>")
    figs = "\n".join(_img(path, cap) for path, cap in images)
    browser = "" if ev.get("browser") is None else (
        f'<h2>Feature browser</h2><p><a href="browser/index.html">Open the feature browser</a>: every member\'s '
        f"latents, their top-activating contexts, quantile samples, activation histograms and logit effects. "
        f"{esc(ev['browser'])}</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>saetool sweep report: {esc(str(sw['output_dir']))}</title><style>{_CSS}</style></head>
<body>
<h1>Sweep report</h1>
<table class="facts">{''.join(f'<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>' for k, v in facts)}</table>
<h2>Members</h2>
<table>{head}{''.join(rows)}</table>
<dl>
<dt>L0, FVU, explained variance, MSE, dead</dt><dd>on the held-out rows (mask applied): FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²;
dead = latents that never fire there; dense = latents firing on more than {ev['dense_threshold']:g} of the tokens.</dd>
<dt>spliced CE, ΔCE, CE recovered, KL</dt><dd>the model's next-token cross-entropy (nats) with the SAE's reconstruction
spliced in at the hook on the held-out contexts; ΔCE = spliced − clean; CE recovered = (CE<sub>zero</sub> − CE<sub>spliced</sub>)
/ (CE<sub>zero</sub> − CE<sub>clean</sub>) (SAELens <code>ce_loss_score</code>); KL = mean over tokens of
KL(p<sub>clean</sub> ‖ p<sub>spliced</sub>).</dd>
<dt>Pareto</dt><dd>on the L0/FVU front (no member has both lower L0 and lower FVU) or the L0/CE-recovered front.
Highlighted rows are on at least one front.</dd>
</dl>
{browser}<h2>Plots</h2>
{figs}
<script>{_SCRIPT}</script>
</body></html>
"""


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
    images = []
    labels = [_label(sp, m["sweep_value"]) for m in members]
    from saetool.browser.build import remove_browser, run_browser

    ev["browser"] = None
    if cfg.browser:
        names = [f"{sp} {v}: {m['name']}" for v, m in zip(labels, members)]
        ev["browser"] = run_browser(cfg, parts, folder, names, lambda: _load_model(cfg, parts["store"], log), log)
    else:
        remove_browser(folder)  # a browser of an earlier report would no longer match this one
    candidates = [
        ("l0_fvu.png",
         lambda f: _plot_frontier(f, members, lambda m: m["heldout"]["fvu"], "FVU (fraction of variance unexplained)",
                                  "pareto_fvu", sp, "Sparsity vs reconstruction (held-out rows)"),
         f"L0 against FVU for every member (labels: {sp}); red: the Pareto front."),
        ("l0_ce_recovered.png",
         lambda f: _plot_frontier(f, members, lambda m: (m["spliced"] or {}).get("ce_loss_recovered"),
                                  "CE loss recovered", "pareto_ce", sp, "Sparsity vs CE loss recovered (spliced)"),
         "L0 against CE loss recovered with the SAE spliced into the model; red: the Pareto front."),
        ("density.png", lambda f: _plot_density(f, members, sp, ev["dense_threshold"]),
         "Histogram of log10 firing frequency of the alive latents of each member; dashed: the dense threshold."),
        ("mmcs.png", lambda f: _plot_mmcs(f, ev["mmcs"], labels),
         ("Mean max cosine similarity: cell (i, j) = mean over member j's decoder atoms of the best cosine with "
          "an atom of member i.")),
    ]
    for name, plot, caption in candidates:
        path = folder / name
        if plot(path):
            images.append((path, caption))
        elif path.exists():
            path.unlink()
    write_json(folder / "evaluation.json", ev)
    page = folder / "index.html"
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(_html(ev, images), encoding="utf-8")
    tmp.replace(page)
    log(f"report: {page}")
    return page


def report_help() -> str:
    """Flag help of `saetool report` (the field docstrings of ReportConfig)."""
    from saetool.flag_docs import help_text

    return help_text(ReportConfig)

