"""After training: the held-out evaluation, the saved sweep folder, metrics.md and the report of one run.

`finish_run` is called by every rank (saving gathers a member-parallel run's members on rank 0); only rank 0 writes.
"""

from __future__ import annotations

from saetool.config import SweepConfig
from saetool.train.loop import Trained
from saetool.train.outputs import evaluate, metrics_table, save_sweep
from saetool.train.setup import SweepRun


def finish_run(run: SweepRun, trained: Trained, log=print, report: bool = True) -> dict | None:
    """Evaluate this rank's members on the held-out rows (every member-parallel rank its own; rank 0 otherwise),
    save the sweep folder, write metrics.md and (with `report` and --report) the HTML report; returns the sweep's
    index on rank 0 (None on other ranks). ValueError (one line) if saving fails (disk full), saying what was kept."""
    cfg = run.cfg
    metrics = None
    if run.eval_rows and not run.idle and (run.by_members or run.dist.is_main):
        metrics = evaluate(run.ensemble, run.store, run.hook, run.eval_rows, cfg.batch_size, cfg.device, run.scale,
                           run.target)
    try:
        index = save_sweep(run, run.out, metrics, trained.summary)
    except OSError as e:
        kept = (f"the trained state is kept in {run.out / 'checkpoint'}: free space and rerun with --resume True to "
                "save it without retraining") if cfg.checkpoint_every else "nothing was kept (no --checkpoint_every)"
        raise ValueError(f"saving the sweep to {run.out} failed ({e.strerror or e}); {kept}") from None
    run.checkpointer.remove()
    if index is None:
        return None
    trained.logger.finish(index["members"])
    if run.eval_rows:
        write_metrics(run, index, log)
    log(f"saved {run.n_members} SAEs to {run.out}")
    if report and cfg.report and run.eval_rows:
        report_run(cfg, run.store.spec.model, log)
    return index


def write_metrics(run: SweepRun, index: dict, log=print) -> None:
    """OUTPUT_DIR/metrics.md: the held-out table of every member (also printed)."""
    table = metrics_table(index["members"], index["sweep_param"])
    n_eval = index["members"][0]["metrics"]["n_tokens"]
    (run.out / "metrics.md").write_text(f"Held-out evaluation on {n_eval} rows of {run.store.path}\n\n{table}\n")
    log(table)


def report_run(cfg: SweepConfig, model: str, log=print) -> None:
    """The HTML report of the sweep finished in cfg.output_dir (`saetool report`), with spliced CE/KL on
    --report_contexts contexts of the store's `model` (none for a synthetic store or --report_contexts 0)."""
    if cfg.array is not None:
        log("report skipped: `saetool report` does not read foreign --array stores yet")
        return
    from saetool.config import ReportConfig, build
    from saetool.report import run_report

    no_model = cfg.report_contexts == 0 or model == "synthetic"
    run_report(build(ReportConfig, {"output_dir": str(cfg.output_dir), "device": str(cfg.device),
                                    "variants_per_forward": 4, "eval_contexts": cfg.report_contexts or None,
                                    "model": "none" if no_model else None}), log=log)
