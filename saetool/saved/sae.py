"""One trained SAE for inference: `SparseLinearAutoencoder` (the original tool's output type, in SAELens layout)."""

from __future__ import annotations

import torch
from torch import nn

from saetool.saes import (
    SAVED_TRANSCODERS,
    get_architecture,
    has_skip,
    is_generic,
    is_transcoder_cfg,
    saved_architecture,
    weight_shapes,
)


def trained_architecture(cfg: dict) -> str:
    """The architecture an SAE was trained as: cfg["metadata"]["saetool_architecture"] when present (a BatchTopK
    SAE is saved as "jumprelu" for inference, as SAELens does), else the architecture that reads a transcoder
    saved by another tool (SAELens' "jumprelu_transcoder" -> "jumprelu"), else cfg["architecture"]."""
    saved = cfg["architecture"]
    return (cfg.get("metadata") or {}).get("saetool_architecture", SAVED_TRANSCODERS.get(saved, saved))


class SparseLinearAutoencoder(nn.Module):
    """A single SAE: f = act((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec, with the architecture's
    inference activation (saetool.saes): ReLU, TopK, JumpReLU (threshold [d_sae]; also BatchTopK and Matryoshka
    BatchTopK with their learned threshold) or Gated (b_gate, b_mag, r_mag instead of b_enc).

    Tensors (SAELens layout): W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] and the
    architecture's own (`weight_shapes`); any missing or unexpected tensor is refused (ValueError).
    `cfg` is the member's cfg.json (architecture, d_in, d_sae, hook_name, hyperparameters such as
    `l1_coefficient` or `k`, ...). `self.arch` is the trained architecture's module (`trained_architecture`).
    Inputs may have any leading shape [..., d_in].

    Two SAELens cfg fields are computed as SAELens 6.54 does (sae_lens/saes/sae.py process_sae_in,
    saes/topk_sae.py): `apply_b_dec_to_input` false encodes x, not x - b_dec; topk `rescale_acts_by_decoder_norm`
    true takes the top k of pre * n and decodes (f / n) W_dec + b_dec, n [d_sae] = ||W_dec[i]||. Both default
    to saetool's own form (true, false).

    A transcoder (cfg architecture one of saetool.saes.transcoder.SAVED_TRANSCODERS, e.g. SAELens' "transcoder" or
    "jumprelu_skip_transcoder") has d_out: W_dec [d_sae, d_out], b_dec [d_out], a skip transcoder also W_skip
    [d_out, d_in]; apply_b_dec_to_input must be false (as SAELens requires). forward(x_in) is then the prediction
    of the output hook, f W_dec + b_dec + x_in W_skip^T, as SAELens' (Skip)Transcoder.forward.
    """

    def __init__(self, weights: dict[str, torch.Tensor], cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.arch = get_architecture(trained_architecture(cfg))
        self.transcoder, skip = is_transcoder_cfg(cfg), has_skip(cfg)
        saved_as = getattr(self.arch, "INFERENCE_ARCHITECTURE", self.arch.NAME)
        if self.transcoder:
            saved_as = saved_architecture(self.arch.NAME, skip)
            if cfg.get("apply_b_dec_to_input", False):
                raise ValueError(f"a transcoder ({cfg['architecture']}) needs apply_b_dec_to_input false (its b_dec "
                                 "is in the output space)")
        if cfg["architecture"] != saved_as:
            raise ValueError(f"a {self.arch.NAME} SAE is saved as architecture {saved_as!r}, cfg says "
                             f"{cfg['architecture']!r}")
        if cfg.get("normalize_activations", "none") not in ("none", None):
            raise ValueError(f"normalize_activations={cfg['normalize_activations']!r}: saetool folds the scale "
                             "into the weights at save; an unfolded checkpoint is not supported")
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        d_out = int(cfg["d_out"]) if self.transcoder else None
        expected = weight_shapes(self.arch, d_in, d_sae, d_out) | ({"W_skip": (d_out, d_in)} if skip else {})
        if set(weights) != set(expected):
            raise ValueError(f"SAE weights must have exactly {sorted(expected)}, got {sorted(weights)}")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(weights[name].shape)}, expected {shape} from cfg")
            setattr(self, name, nn.Parameter(weights[name], requires_grad=False))
        self.weight_names = tuple(expected)
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", not self.transcoder))
        self.rescale_acts_by_decoder_norm = self.arch.NAME == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm"))
        if not is_generic(self.arch):
            missing = [h for h in self.arch.HYPERPARAMS if h not in cfg]
            if missing:
                raise ValueError(f"cfg lacks hyperparameters {missing} of architecture {self.arch.NAME!r}")
        self._hp = {h: torch.tensor(cfg[h]) for h in self.arch.HYPERPARAMS if h in cfg}
        if hasattr(self.arch, "default_options"):
            self._hp.update({k: cfg.get(k, v) for k, v in self.arch.default_options(d_sae).items()})

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        """The width of the reconstruction: d_in for an SAE, the output hook's for a transcoder."""
        return self.W_dec.shape[1]

    def weights(self) -> dict[str, torch.Tensor]:
        """{name: tensor} of every saved tensor."""
        return {name: getattr(self, name) for name in self.weight_names}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> latents f [..., d_sae] (computed in the SAE's dtype)."""
        x = x.to(self.W_enc.dtype)
        if is_generic(self.arch):
            w = {**self.weights(), "apply_b_dec_to_input": self.apply_b_dec_to_input}  # saetool.saes._common.center
            return self.arch.encode(w, x, self._hp, training=False)[0]
        pre = ((x - self.b_dec) if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return self.arch.activation(pre, self._hp)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., d_sae] -> x_hat [..., d_out] (a skip transcoder's skip term is added by forward)."""
        f = f.to(self.W_dec.dtype)
        if self.rescale_acts_by_decoder_norm:
            f = f * (1 / self.W_dec.norm(dim=-1))
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat [..., d_out] (the original's `predict`; a transcoder's prediction of its output
        hook from its input x, skip term included)."""
        x_hat = self.decode(self.encode(x))
        if "W_skip" in self.weight_names:
            x_hat = x_hat + x.to(self.W_skip.dtype) @ self.W_skip.T
        return x_hat

    def __repr__(self) -> str:
        hp = ", ".join(f"{h}={self.cfg[h]}" for h in self.arch.HYPERPARAMS if h in self.cfg)
        out = f", d_out={self.d_out}" if self.transcoder else ""
        return f"SparseLinearAutoencoder({self.arch.NAME}, d_in={self.d_in}, d_sae={self.d_sae}{out}, {hp})"
