"""Exports to the tools people use: Neuronpedia's bulk import, sparsify's folders, circuit-tracer transcoder sets."""

from __future__ import annotations

from saetool.export.circuit_tracer import write_transcoder_sets
from saetool.export.neuronpedia import export_neuronpedia
from saetool.export.sparsify import export_sparsify

__all__ = ["export_neuronpedia", "export_sparsify", "write_transcoder_sets"]
