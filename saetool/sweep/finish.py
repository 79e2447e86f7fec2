"""After training, on rank 0, once the training state is freed: the held-out pass, sweep.json, metrics.md and the report.

The held-out rows are read and encoded once (saetool.evaluate.heldout_stats) by the saved members, and that one pass
feeds the members' metrics in sweep.json and metrics.md, the W&B evaluation log, and the report with its feature
browser (whose collector the report package makes and this pass fills). sweep.json, the finished marker, is written
after the pass; the checkpoint is removed only then, so a failure before it still resumes with --resume.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from saetool.config import ReportConfig, SweepConfig, build
from saetool.evaluate import heldout_stats, member_metrics, metrics_table
from saetool.report import heldout_collector, run_report
from saetool.saved import INDEX_FILE, load_sae, write_json
from saetool.store import ActivationStore
from saetool.util import injected_delay


@dataclass
class SavedRun:
    """What finishing a trained run needs once its ensemble, optimizer and loader are gone: its config, folder,
    unfinished index (saetool.train.save_members), store, hooks, held-out rows and its open logger."""

    cfg: SweepConfig
    out: Path
    index: dict
    store: ActivationStore
    hook: str
    target: str | None
    eval_rows: tuple[int, int] | None
    logger: object


def report_config(cfg: SweepConfig, model: str) -> ReportConfig:
    """The report a sweep writes with --report: on cfg.device, spliced CE/KL on --report_contexts contexts of the
    store's `model` (none for a synthetic store or --report_contexts 0)."""
    no_model = cfg.report_contexts == 0 or model == "synthetic"
    return build(ReportConfig, {"output_dir": str(cfg.output_dir), "device": str(cfg.device), "variants_per_forward": 4,
                                "eval_contexts": cfg.report_contexts or None, "model": "none" if no_model else None})


def finish(saved: SavedRun, log=print, report: bool = True) -> dict:
    """Evaluate the saved members on the held-out rows (one pass), write sweep.json and metrics.md, log the metrics
    to W&B, remove the checkpoint and (with `report` and --report) write the report from the same pass. Returns the
    sweep's index."""
    injected_delay("finish")  # tests only: a long report on rank 0
    cfg, out, index = saved.cfg, saved.out, saved.index
    report_cfg = report_config(cfg, saved.store.spec.model) if report and cfg.report and saved.eval_rows else None
    if report_cfg is not None and cfg.array is not None:
        log("report skipped: `saetool report` does not read foreign --array stores yet")
        report_cfg = None
    heldout = None
    if saved.eval_rows:
        saes = [load_sae(out / e["path"], device=cfg.device, dtype="float32") for e in index["members"]]
        collector = heldout_collector(report_cfg, saes, saved.store) if report_cfg is not None else None
        heldout = heldout_stats(saes, saved.store, saved.hook, saved.eval_rows, cfg.device, collector, saved.target)
        for entry, stats in zip(index["members"], heldout.stats, strict=True):
            entry["metrics"] = member_metrics(stats)
    write_json(out / INDEX_FILE, index)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    saved.logger.finish(index["members"])
    if heldout is not None:
        table = metrics_table(index["members"], index["sweep_param"])
        n_eval = index["members"][0]["metrics"]["n_tokens"]
        (out / "metrics.md").write_text(f"Held-out evaluation on {n_eval} rows of {saved.store.path}\n\n{table}\n")
        log(table)
    log(f"saved {len(index['members'])} SAEs to {out}")
    if report_cfg is not None:
        run_report(report_cfg, log=log, heldout=heldout)
    return index
