"""`saetool generate`'s settings: `GenerateConfig`. Each field's docstring (the string under it) is its CLI help."""

from __future__ import annotations

from dataclasses import dataclass, field

from saetool.config.parse import check, check_device, default_device


@dataclass
class GenerateConfig:
    model: str = "smollm2-135m"
    """Model: "smollm2-135m" (embedded, offline), a local HF model folder, or a hub name such as EleutherAI/pythia-70m-deduped."""
    dataset: str = "shakespeare"
    """Text: "shakespeare" (embedded, offline), a local .txt/.jsonl/.parquet file or folder, or a hub dataset name."""
    dataset_split: str = "train"
    """Split of a hub dataset."""
    text_column: str = "text"
    """Column holding the text (jsonl, parquet, hub datasets)."""
    locations: list[str] = field(default_factory=lambda: ["residual"])
    """Hook points: TransformerLens hook names (blocks.2.hook_resid_post) or aliases expanded over --layers:
    residual, mlp, mlpin (the MLP's input, mlp.hook_in), mlpout, attn_concat, attn (= hook_attn_out)."""
    layers: list[int] = field(default_factory=lambda: [2])
    """Layers for the location aliases."""
    dataset_folder: str = "activation_data"
    """The Zarr store to write (created, or resumed if it holds a partial run with the same settings)."""
    n_chunks: int | None = None
    """Chunks to produce (the budget: n_chunks x chunk_size tokens); None = as many as the text fills. The text is
    streamed and read only as far as the budget; a corpus that ends first is stored whole, with a warning."""
    chunk_size: int = 16384
    """Rows (tokens) per chunk; a multiple of --context_size. A chunk is the unit of compression, commit and shuffling."""
    context_size: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 8
    """Contexts per model forward."""
    prepend_bos: bool = True
    """Start every context with BOS (its row is stored but masked out of training)."""
    concat: bool = True
    """Concatenate documents (separated by EOS) into full contexts; False = one document per context group, padded."""
    seed: int = 0
    """Seed of the context shuffle buffer; the store's rows depend only on the text, the settings and this seed."""
    shuffle_buffer: int = 8192
    """Contexts in the seeded shuffle buffer that mixes the streamed contexts (memory: 5 bytes x context_size each,
    5.2 MB at 8192 x 128); with --n_chunks x chunk_size / context_size <= this, the stored contexts are fully permuted."""
    dtype: str = "float16"
    """Stored activation dtype: float16 (overflow-checked), bfloat16 or float32."""
    compression: str = "blosc-zstd"
    """Codec: blosc-zstd (byte shuffle), zstd or none."""
    keepbits: int | None = None
    """Lossy: round stored values to this many mantissa bits (nearest, ties to even, as numcodecs BitRound) before
    compressing; None = lossless. Full precision: float16 10, bfloat16 7, float32 23."""
    device: str = field(default_factory=default_device)
    """Torch device of the model."""
    model_dtype: str = "float32"
    """dtype the model runs in: float32, bfloat16 or float16."""
    dist_timeout: float = 1800.0
    """Seconds a collective (barrier, all-reduce, gather) may wait under several processes before the process group
    fails it, for gloo (CPU) and NCCL (GPU, whose own default is 600 s) alike; the launchers (launch/*.py) create the
    group with it. No rank waits in a collective on unbounded work of another (docs/distributed.md)."""

    def validate(self) -> None:
        check_device(self.device)
        check(self.context_size >= 2, "context_size", "must be >= 2")
        check(self.chunk_size >= self.context_size and self.chunk_size % self.context_size == 0, "chunk_size",
               f"must be a positive multiple of context_size={self.context_size}")
        check(self.n_chunks is None or self.n_chunks >= 1, "n_chunks", "must be >= 1 (or None for all the text)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.dist_timeout > 0, "dist_timeout", "must be > 0 seconds")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check(self.dtype in ("float16", "bfloat16", "float32"), "dtype", "must be float16, bfloat16 or float32")
        check(self.compression in ("blosc-zstd", "zstd", "none"), "compression", "must be blosc-zstd, zstd or none")
        check(len(self.locations) > 0, "locations", "needs at least one hook point")
        bits = {"float16": 10, "bfloat16": 7, "float32": 23}[self.dtype]
        check(self.keepbits is None or 0 <= self.keepbits <= bits, "keepbits",
               f"must be in 0..{bits} for --dtype {self.dtype} (or None for lossless)")
