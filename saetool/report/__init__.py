"""The sweep report (plots, the member table, one HTML page) and the latent browser."""

from __future__ import annotations

from saetool.report.browser.build import browser_blocker, collect_results, make_collector, member_logits
from saetool.report.browser.collect import HIST_EDGES, encode_pass
from saetool.report.browser.logits import token_strings
from saetool.report.browser.records import latent_record
from saetool.report.sweep_report import evaluate_sweep, pareto_front, run_report, write_report

__all__ = ['HIST_EDGES', 'browser_blocker', 'collect_results', 'encode_pass', 'evaluate_sweep', 'latent_record', 'make_collector', 'member_logits', 'pareto_front', 'run_report', 'token_strings', 'write_report']
