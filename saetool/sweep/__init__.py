"""The sweep driver: one hook, several hooks on one read, and `--config` ensembles (`run_sweep`), with the flags of
a sweep YAML (`with_config`, `load_sweep_config`)."""

from __future__ import annotations

from saetool.sweep.driver import run_sweep, several_hooks
from saetool.sweep.ensembles import ensemble_configs, load_sweep_config, with_config
from saetool.sweep.multihook import hook_pairs, member_cost, member_shares

__all__ = ["ensemble_configs", "hook_pairs", "load_sweep_config", "member_cost", "member_shares", "run_sweep",
           "several_hooks", "with_config"]
