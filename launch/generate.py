"""`accelerate launch launch/generate.py --flag value ...`: activation generation, one store, several processes.

Each process owns the store chunks c with c % num_processes == rank (saetool.generate). Flags as `saetool generate`.
"""

from accelerate import Accelerator

from saetool.cli import run_cli
from saetool.config import GenerateConfig, build


def main(**flags):
    from saetool.generate import run_generate

    cfg = build(GenerateConfig, flags)
    acc = Accelerator(cpu=cfg.device == "cpu")
    if "device" not in flags:
        cfg.device = str(acc.device)
    run_generate(cfg, rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone,
                 log=acc.print)


if __name__ == "__main__":
    run_cli(main, name="launch/generate.py")
