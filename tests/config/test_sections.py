"""The sweep flags stay flat (CLI, YAML, SweepConfig) and fall into sections that the layers receive."""

import dataclasses

from saetool.config import SECTIONS, SweepConfig, build


def test_every_sweep_flag_is_in_exactly_one_section():
    fields = [f.name for f in dataclasses.fields(SweepConfig)]
    placed = [name for names in SECTIONS.values() for name in names]
    assert sorted(placed) == sorted(fields)  # none missing, none twice
    assert list(SECTIONS) == ["data", "arch", "training", "runtime", "output"]


def test_sections_carry_the_flat_flags_as_typed():
    cfg = build(SweepConfig, {"dataset_dir": "s.zarr", "batch_size": "512", "adam_lr": "3e-4", "device": "cpu",
                              "autocast": "bf16", "architecture": "topk", "k_values": "8,16", "report": "False"})
    assert (cfg.data.dataset_dir, cfg.data.batch_size) == ("s.zarr", 512)
    assert (cfg.arch.architecture, cfg.arch.k_values) == ("topk", [8, 16])
    assert cfg.training.adam_lr == 3e-4
    assert (cfg.runtime.device, cfg.runtime.step_precision) == ("cpu", "bf16")  # the deprecated alias, resolved
    assert cfg.output.report is False
    for name, names in SECTIONS.items():
        section = getattr(cfg, name)
        assert dataclasses.asdict(section) == {n: getattr(cfg, n) for n in names}
        assert dataclasses.is_dataclass(section) and section.__dataclass_params__.frozen
