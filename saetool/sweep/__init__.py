"""The sweep driver: one hook, several hooks on one read, and `--config` ensembles."""

from __future__ import annotations

from saetool.sweep.driver import run_sweep, with_config

__all__ = ['run_sweep', 'with_config']
