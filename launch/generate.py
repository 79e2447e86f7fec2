"""`accelerate launch launch/generate.py --flag value ...`: activation generation, one store, several processes.

Flags as `saetool generate`. Rank 0 converts the embedded model (once) and streams the text into the store's tokens;
then the chunks without activations are split into one contiguous share per process (saetool.generate).
Without --device (or with --device cuda) each process uses Accelerate's device: cuda:<local rank>, or cpu.
On CPU use `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/generate.py --device cpu`
(`accelerate launch --cpu --num_processes 2` silently starts ONE process).
"""

from accelerate import Accelerator

from saetool.cli import run_cli
from saetool.config import GenerateConfig, build
from saetool.generate import run_generate
from saetool.util import Dist


def main(**flags):
    cfg = build(GenerateConfig, flags)
    acc = Accelerator(cpu=cfg.device == "cpu")
    if "device" not in flags or cfg.device == "cuda":  # one GPU per process: cuda:<local rank>
        cfg.device = str(acc.device)
    run_generate(cfg, dist=Dist(acc.process_index, acc.num_processes), log=acc.print)


if __name__ == "__main__":
    run_cli(main, name="launch/generate.py")
