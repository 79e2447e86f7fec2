"""`accelerate launch launch/sweep.py --ratio 8 ...`: an SAE sweep over one or many processes.

Flags as `saetool sweep`, plus `--parallel data|members` (see saetool/sweep/driver.py). Each process trains on its
Accelerate device (cuda:local_rank on GPUs; CPU processes on gloo with `Accelerator(cpu=True)`); --dist_timeout sets
the process group's collective timeout.
"""

from saetool.cli import run_cli
from saetool.config import SweepConfig, build
from saetool.sweep import run_sweep, with_config
from saetool.util import accelerator


def main(**flags):
    cfg = build(SweepConfig, with_config(flags))
    acc = accelerator(cpu=cfg.device == "cpu", dist_timeout=cfg.dist_timeout)  # the process group: --dist_timeout
    cfg.device = str(acc.device)
    run_sweep(cfg, log=acc.print)
    acc.end_training()


if __name__ == "__main__":
    run_cli(main, name="launch/sweep.py")
