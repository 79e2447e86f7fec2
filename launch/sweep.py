"""`accelerate launch launch/sweep.py --ratio 8 ...`: an SAE sweep (flags as `saetool sweep`).

This release trains in the main process only; the data- and member-parallel modes are the next issue.
"""

from accelerate import Accelerator

from saetool.cli import run_cli
from saetool.config import SweepConfig, build


def main(**flags):
    from saetool.sweep import run_sweep

    cfg = build(SweepConfig, flags)
    acc = Accelerator(cpu=cfg.device == "cpu")
    if acc.num_processes > 1:
        raise ValueError("launch/sweep.py runs on one process in this release; use --num_processes 1")
    if "device" not in flags:
        cfg.device = str(acc.device)
    run_sweep(cfg, log=acc.print)


if __name__ == "__main__":
    run_cli(main, name="launch/sweep.py")
