"""`accelerate launch launch/generate.py --flag value ...`: activation generation, one store, several processes.

Flags as `saetool generate`. Rank 0 converts the embedded model (once) and streams the text into the store's tokens,
committing them chunk by chunk; every process records the activations of every N-th chunk as soon as its tokens are
committed (saetool.generate). --dist_timeout sets the process group's collective timeout.
Without --device (or with --device cuda) each process uses Accelerate's device: cuda:<local rank>, or cpu.
On CPU use `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/generate.py --device cpu`
(`accelerate launch --cpu --num_processes 2` silently starts ONE process).
"""

from saetool.cli import run_cli
from saetool.config import GenerateConfig, build
from saetool.generate import run_generate
from saetool.util import Dist, accelerator


def main(**flags):
    cfg = build(GenerateConfig, flags)
    acc = accelerator(cpu=cfg.device == "cpu", dist_timeout=cfg.dist_timeout)  # the process group: --dist_timeout
    if "device" not in flags or cfg.device == "cuda":  # one GPU per process: cuda:<local rank>
        cfg.device = str(acc.device)
    run_generate(cfg, dist=Dist(acc.process_index, acc.num_processes), log=acc.print)


if __name__ == "__main__":
    run_cli(main, name="launch/generate.py")
