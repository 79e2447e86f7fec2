"""The run settings: one dataclass per command (`GenerateConfig`, `SweepConfig`, `ReportConfig`, `NeuronpediaConfig`,
`SparsifyConfig`), whose field docstrings are the CLI help and docs/flags.md, and `build`, which turns flags into a
validated config (one-line ValueError naming the flag)."""

from __future__ import annotations

from saetool.config.flags import help_text, markdown_flags
from saetool.config.generate import GenerateConfig
from saetool.config.parse import build, check_device, default_device, join_names
from saetool.config.report import DENSE_THRESHOLD, NeuronpediaConfig, ReportConfig, SparsifyConfig
from saetool.config.sweep import (
    ARCHITECTURE_FLAGS,
    AUTO_CLIP_ARCHITECTURES,
    SECTIONS,
    ArchitectureSection,
    DataSection,
    OutputSection,
    RuntimeSection,
    SweepConfig,
    TrainingSection,
)

__all__ = ["ARCHITECTURE_FLAGS", "AUTO_CLIP_ARCHITECTURES", "DENSE_THRESHOLD", "SECTIONS", "ArchitectureSection",
           "DataSection", "GenerateConfig", "NeuronpediaConfig", "OutputSection", "ReportConfig", "RuntimeSection",
           "SparsifyConfig", "SweepConfig", "TrainingSection", "build", "check_device", "default_device", "help_text",
           "join_names", "markdown_flags"]
