"""The report's page: PNG plots (matplotlib's object API: no pyplot state, no display needed) and one
self-contained HTML file (every plot base64-embedded, no external resources), from the numbers of
:func:`saetool.report.sweep_report.evaluate_sweep`.

``write_page(folder, ev, labels)`` writes into ``folder``: ``l0_fvu.png`` (L0 against FVU, Pareto front marked),
``l0_ce_recovered.png`` (L0 against CE loss recovered, when the spliced evaluation ran), ``density.png`` (log10
firing-density histograms), ``mmcs.png`` (decoder MMCS between members, 2+ members) and ``index.html`` (written
under a temporary name and renamed into place). A plot that has nothing to show is not written (and an earlier one
is removed).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_label(sweep_param: str, v) -> str:
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
        ax.annotate(plot_label(sweep_param, m["sweep_value"]), (x, y), textcoords="offset points",
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
        ax.set_title(f"{sweep_param} {plot_label(sweep_param, m['sweep_value'])}: {d['n_dead']} dead, {d['n_dense']} dense",
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


def _facts(sw: dict, ev: dict) -> list[tuple[str, object]]:
    """(label, value) rows of the page's facts table: the sweep, its training and its spliced baselines."""
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
    return facts


def _member_row(m: dict, p: str) -> str:
    """One member's <tr> of the members table (class "front" when on a Pareto front); `p` the sweep parameter."""
    esc = html.escape
    h, d, s, n = m["heldout"] or {}, m["density"] or {}, m["spliced"] or {}, m["decoder_norms"]
    front = " ".join(x for x, f in (("FVU", m["pareto_fvu"]), ("CE", m["pareto_ce"])) if f)
    cls = ' class="front"' if front else ""
    return (
        f"<tr{cls}><td>{esc(plot_label(p, m['sweep_value']))}</td><td>{_fmt(h.get('l0'), '.1f')}</td>"
        f"<td>{_fmt(h.get('fvu'), '.4f')}</td><td>{_fmt(h.get('explained_variance'), '.4f')}</td>"
        f"<td>{_fmt(h.get('mse'))}</td><td>{_fmt(d.get('n_dead'), 'd')}</td><td>{_fmt(d.get('n_dense'), 'd')}</td>"
        f"<td class=\"n\">{_fmt(n['mean'], '.4f')} ({_fmt(n['min'], '.3f')}–{_fmt(n['max'], '.3f')})</td>"
        f"<td>{_fmt(s.get('spliced_ce'), '.4f')}</td><td>{_fmt(s.get('ce_delta'), '.4f')}</td>"
        f"<td>{_fmt(s.get('ce_loss_recovered'), '.4f')}</td><td>{_fmt(s.get('kl'), '.4g')}</td>"
        f"<td class=\"l\">{esc(front)}</td><td class=\"l\">{esc(m['name'])}</td></tr>")


def _html(ev: dict, images: list[tuple[Path, str]]) -> str:
    sw = ev["sweep"]
    p = sw["sweep_param"]
    esc = html.escape
    facts = _facts(sw, ev)
    rows = [_member_row(m, p) for m in ev["members"]]
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


def write_page(folder: Path, ev: dict, labels: list[str]) -> Path:
    """Write the plots and ``index.html`` of the evaluation ``ev`` into ``folder`` (see the module docstring);
    ``labels`` name the members on the plots. Returns the path of ``index.html``."""
    members, sp = ev["members"], ev["sweep"]["sweep_param"]
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
    images = []
    for name, plot, caption in candidates:
        path = folder / name
        if plot(path):
            images.append((path, caption))
        elif path.exists():
            path.unlink()
    page = folder / "index.html"
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(_html(ev, images), encoding="utf-8")
    tmp.replace(page)
    return page
