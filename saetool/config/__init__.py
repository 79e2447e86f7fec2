"""The run configurations (`GenerateConfig`, `SweepConfig`, `ReportConfig`), flag parsing (`build`) and the flag
documentation generated from the field docstrings (`python -m saetool.config.flags`)."""

from __future__ import annotations

from saetool.config.configs import (
    ARCHITECTURE_FLAGS,
    GenerateConfig,
    SweepConfig,
    _default_device,
    _names,
    build,
    check_device,
)
from saetool.config.flags import help_text

__all__ = ['ARCHITECTURE_FLAGS', 'GenerateConfig', 'SweepConfig', '_default_device', '_names', 'build', 'check_device', 'help_text']
