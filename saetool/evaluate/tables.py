"""The held-out metrics as Markdown tables (metrics.md, and what a sweep prints when it ends)."""

from __future__ import annotations

from saetool.saes import get_architecture

__all__ = ["frontier_table", "metrics_table"]


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _metric_cells(m: dict) -> str:
    """The metric columns shared by metrics_table and frontier_table."""
    return (f"{m['mse']:.4g} | {m['fvu']:.4f} | {m['explained_variance']:.4f} | {m['l0']:.1f} | "
            f"{100 * m['dead_fraction']:.1f}% |")


def metrics_table(rows: list[dict], sweep_param: str) -> str:
    """A Markdown table of member metrics sorted by the swept hyperparameter."""
    lines = [f"| {sweep_param} | MSE | FVU | explained var. | L0 | dead latents |", "|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r[sweep_param]):
        lines.append(f"| {_value(r[sweep_param])} | {_metric_cells(r['metrics'])}")
    return "\n".join(lines)


def frontier_table(members: list[dict]) -> str:
    """Markdown table of members of several architectures, sorted by architecture then L0."""
    lines = ["| architecture | hyperparameter | MSE | FVU | explained var. | L0 | dead latents |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in sorted(members, key=lambda m: (m["architecture"], -m["metrics"]["l0"])):
        param = get_architecture(m["architecture"]).SWEEP_PARAM
        lines.append(f"| {m['architecture']} | {param} {_value(m[param])} | {_metric_cells(m['metrics'])}")
    return "\n".join(lines)
