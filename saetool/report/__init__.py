"""The sweep report (plots, the member table, one HTML page) and the latent browser."""

from __future__ import annotations

from saetool.report.browser.build import browser_blocker, collect_results, make_collector, member_logits
from saetool.report.browser.collect import HIST_EDGES
from saetool.report.browser.logits import token_strings
from saetool.report.browser.records import latent_record
from saetool.report.sweep_report import (
    SweepEvaluation,
    evaluate_sweep,
    heldout_collector,
    pareto_front,
    run_report,
    write_report,
)

__all__ = ['HIST_EDGES', 'SweepEvaluation', 'browser_blocker', 'collect_results', 'evaluate_sweep', 'heldout_collector', 'latent_record', 'make_collector', 'member_logits', 'pareto_front', 'run_report', 'token_strings', 'write_report']
