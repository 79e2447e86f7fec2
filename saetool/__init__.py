"""saetool: record language-model activations into compressed Zarr stores and train sweeps of sparse autoencoders
(SAEs) and transcoders as one stacked ensemble, then evaluate, browse and export them.

The pipeline, one package a stage (docs/development.md):
text -> lm -> store -> generate -> saes / ensemble -> train -> saved -> evaluate -> report -> export, driven by sweep.

The Python API (each command of the CLI is one call):

    from saetool import GenerateConfig, SweepConfig, run_generate, run_sweep, load_sweep
    run_generate(GenerateConfig(dataset_folder="runs/acts.zarr", n_chunks=2, device="cpu"))
    run_sweep(SweepConfig(dataset_dir="runs/acts.zarr", output_dir="runs/sweep", ratio=4, device="cpu"))
    saes = load_sweep("runs/sweep")          # {l1_coefficient: SparseLinearAutoencoder}
"""

from saetool.util import __version__  # noqa: I001 (first: every stage records it)
from saetool.config import (
    GenerateConfig,
    NeuronpediaConfig,
    ReportConfig,
    SparsifyConfig,
    SweepConfig,
    build,
)
from saetool.evaluate import evaluate_spliced
from saetool.export import export_neuronpedia, export_sparsify
from saetool.generate import run_generate
from saetool.lm import load_model
from saetool.report import run_report, write_report
from saetool.saved import SparseLinearAutoencoder, load_sae, load_sweep, read_index
from saetool.store import ActivationStore
from saetool.sweep import run_sweep

__all__ = ["ActivationStore", "GenerateConfig", "NeuronpediaConfig", "ReportConfig", "SparseLinearAutoencoder",
           "SparsifyConfig", "SweepConfig", "__version__", "build", "evaluate_spliced", "export_neuronpedia",
           "export_sparsify", "load_model", "load_sae", "load_sweep", "read_index", "run_generate", "run_report",
           "run_sweep", "write_report"]
