"""saetool: record language-model activations into compressed Zarr stores and train sweeps of sparse
autoencoders (SAEs) as one stacked ensemble."""

__version__ = "0.1.0"
