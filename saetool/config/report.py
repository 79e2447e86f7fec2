"""The settings of the commands that read a finished sweep: `saetool report` (`ReportConfig`) and
`saetool export neuronpedia|sparsify` (`NeuronpediaConfig`, `SparsifyConfig`). Each field's docstring is its CLI help."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from saetool.config.parse import check_device, default_device

# A latent is dense when it fires on more than this fraction of held-out tokens (saetool.evaluate.latent_stats).
DENSE_THRESHOLD = 0.1


@dataclass
class ReportConfig:
    output_dir: str = "sweep_outputs"
    """The finished sweep folder (the one holding sweep.json); the report goes to OUTPUT_DIR/report/."""
    dataset_dir: str | None = None
    """The activation store of the sweep; default: the path recorded in sweep.json."""
    model: str | None = None
    """Model for the spliced CE/KL evaluation: default the store's model (skipped with a note if it cannot be loaded); "none" skips it."""
    eval_contexts: int | None = None
    """Use at most this many held-out contexts in the spliced evaluation (None: all of them)."""
    batch_size: int = 8
    """Contexts per model forward in the spliced evaluation."""
    variants_per_forward: int = 1
    """Spliced variants (ablations, members) stacked into one model forward (1 = one forward each)."""
    device: str = field(default_factory=default_device)
    """Torch device for the model and the SAEs."""
    model_dtype: str = "float32"
    """dtype the model runs in: float32, bfloat16 or float16."""
    dense_threshold: float = DENSE_THRESHOLD
    """A latent is dense when it fires on more than this fraction of held-out tokens."""
    browser: bool = True
    """Write the feature browser (report/browser/): per member and latent, top contexts, quantile samples, histogram, logit effects."""
    browser_rows: int | None = None
    """Browser contexts from the first N rows of the store (training rows, a separate pass) instead of the held-out rows."""
    browser_top: int = 20
    """Top-activating positions shown per latent."""
    browser_samples: int = 25
    """Random firing positions kept per latent, shown in 5 activation-quantile groups."""
    browser_before: int = 12
    """Context tokens shown before each position."""
    browser_after: int = 4
    """Context tokens shown after each position."""
    browser_max_latents: int = 16384
    """Page budget: latents per member in the browser (a wider member shows its first N, with a note)."""
    browser_logits: int = 10
    """Promoted and suppressed tokens per latent (W_dec @ W_U, residual-stream hooks only; 0: none)."""

    def validate(self) -> None:
        check_device(self.device)
        if self.batch_size < 1:
            raise ValueError("--batch_size must be >= 1")
        if self.variants_per_forward < 1:
            raise ValueError("--variants_per_forward must be >= 1")
        if self.eval_contexts is not None and self.eval_contexts < 1:
            raise ValueError("--eval_contexts must be >= 1 (or None for all)")
        if not 0 <= self.dense_threshold <= 1:
            raise ValueError("--dense_threshold must be in [0, 1]")
        if self.browser_rows is not None and self.browser_rows < 1:
            raise ValueError("--browser_rows must be >= 1 (or None for the held-out rows)")
        for name in ("browser_top", "browser_max_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        for name in ("browser_samples", "browser_before", "browser_after", "browser_logits"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0")


@dataclass
class NeuronpediaConfig:
    output_dir: str = "sweep_outputs"
    """The finished sweep folder (the one holding sweep.json)."""
    export_dir: str | None = None
    """Where to write the Neuronpedia layout (default OUTPUT_DIR/export/neuronpedia); an earlier export there is replaced whole, any other non-empty folder (or one holding the sweep or its store) is refused."""
    dataset_dir: str | None = None
    """The sweep's activation store; default: the path recorded in sweep.json."""
    model: str | None = None
    """Model for token strings and logit effects (default: the store's model)."""
    model_id: str | None = None
    """Neuronpedia model id (default: the store's model name in lower case with dashes)."""
    source_set: str = "saetool"
    """Prefix of each member's Neuronpedia source set (then the member's folder name)."""
    creator_name: str = "saetool"
    """creatorName / creatorNameShort of the release and source sets."""
    creator_id: str = "saetool"
    """creatorId of every record (Neuronpedia's importer replaces it with the uploading account's)."""
    browser_rows: int | None = None
    """Contexts from the first N rows of the store (training rows) instead of the held-out rows."""
    browser_top: int = 20
    """Top-activating contexts per feature."""
    browser_samples: int = 25
    """Random firing contexts per feature, in 5 activation-quantile bands."""
    browser_before: int = 64
    """Tokens of each context before the position."""
    browser_after: int = 16
    """Tokens of each context after the position."""
    browser_max_latents: int = 1 << 30
    """Export latents [0, N) of each member."""
    browser_logits: int = 10
    """Top and bottom logit tokens per feature (at most 20)."""
    device: str = field(default_factory=default_device)
    """Torch device for the SAEs and the model."""

    def validate(self) -> None:
        check_device(self.device)
        if self.browser_rows is not None and self.browser_rows < 1:
            raise ValueError("--browser_rows must be >= 1 (or None for the held-out rows)")
        if not 0 <= self.browser_logits <= 20:
            raise ValueError("--browser_logits must be in 0..20 (Neuronpedia shows at most 20)")
        for name in ("browser_top", "browser_max_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        for name in ("browser_samples", "browser_before", "browser_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0")
        if not re.fullmatch(r"[A-Za-z0-9\-]+", self.source_set):
            raise ValueError(f"--source_set {self.source_set!r} may hold only letters, digits and dashes")


@dataclass
class SparsifyConfig:
    output_dir: str = "sweep_outputs"
    """The finished sweep folder (the one holding sweep.json)."""
    export_dir: str | None = None
    """Where to write the sparsify folders (default OUTPUT_DIR/export/sparsify); an earlier export there is replaced whole, any other non-empty folder (or one holding the sweep or its store) is refused."""
    hookpoint: str | None = None
    """sparsify's module name for the members' hook (default: layers.L for blocks.L.hook_resid_post, see docs/exports.md)."""

    def validate(self) -> None:
        if self.hookpoint is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.hookpoint):
            raise ValueError(f"--hookpoint {self.hookpoint!r} must be a module name such as layers.3")
