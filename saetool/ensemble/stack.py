"""N SAEs of one architecture and shape, trained together as one stacked module.

Parameters carry a leading member axis (the field's names):
    W_enc [n_members, d_in, d_sae]   b_enc [n_members, d_sae]
    W_dec [n_members, d_sae, d_out]  b_dec [n_members, d_out]     (d_out = d_in for an SAE)
A transcoder ensemble (d_out given; Dunefsky et al. 2024, "Transcoders Find Interpretable LLM Feature Circuits",
arXiv:2406.11944) encodes one hook x_in and predicts another, x_out:
    f = act(x_in W_enc + b_enc)      y_hat = f W_dec + b_dec (+ x_in W_skip^T with skip_connection)
Input-centring convention: the input is NOT centred by b_dec (b_dec lives in the output space; SAELens' transcoders
require apply_b_dec_to_input False, and b_enc absorbs any input offset). W_skip [n_members, d_out, d_in] starts at
zero (SAELens' SkipTranscoder, sparsify's skip_connection). The loss's reconstruction term is the MSE to x_out.
plus, per architecture (saetool.saes, `init_extra`), extra parameters with the same leading axis (JumpReLU's
log_threshold, Gated's b_gate/b_mag/r_mag, which also has no b_enc) and buffers (BatchTopK's threshold).
Per-member hyperparameters are buffers [n_members] (`l1_coefficient`, `k`, `l0_coefficient`, `bandwidth`). Every member sees the same
batch x [batch, d_in]; the forward is two batched matmuls (`torch.baddbmm`) for all members, and the loss is
the SUM of the members' losses, so each member's gradient is exactly its own loss's gradient. Adam is
elementwise with a step counter shared by members that always step together, so `torch.optim.Adam` over the
stacked tensors is exactly per-member Adam (the original tool froze Adam's step counter at 1; we do not).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from saetool.ensemble.recipes import auxk_loss, clip_grad_norm_per_member, decoder_weighted_l1, nonzero_count
from saetool.saes import (
    check_transcoder,
    get_architecture,
    global_sum,
    is_generic,
    options_of,
    saved_architecture,
)
from saetool.saes import decode as generic_decode


def _unit_rows(g: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """float64 [rows, cols] drawn U(-1/sqrt(cols), 1/sqrt(cols)) (Kaiming-uniform), each row scaled to unit norm."""
    bound = 1.0 / math.sqrt(cols)
    w = (torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1) * bound
    return w / w.norm(dim=-1, keepdim=True)


def init_member(d_in: int, d_sae: int, seed: int, dtype: torch.dtype = torch.float32, d_out: int | None = None
                ) -> dict[str, torch.Tensor]:
    """Initial weights of one SAE from its own seed (so member i of a sweep equals a lone SAE with that seed).

    W_dec: rows drawn U(-1/sqrt(d_in), 1/sqrt(d_in)) (Kaiming-uniform) then scaled to unit norm; W_enc = W_dec^T
    (the encoder-as-decoder-transpose init of Gao et al. 2024 / Conerly et al. 2024); b_enc = b_dec = 0.
    A transcoder (d_out given) maps one space into another, so the transpose has no meaning: W_dec [d_sae, d_out] is
    drawn as above, then, from the same generator, W_enc^T [d_sae, d_in] the same way (unit-norm encoder columns).
    Returns float tensors W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out].
    """
    g = torch.Generator().manual_seed(seed)
    W_dec = _unit_rows(g, d_sae, d_in if d_out is None else d_out)
    W_enc_t = W_dec if d_out is None else _unit_rows(g, d_sae, d_in)
    return {
        "W_enc": W_enc_t.T.contiguous().to(dtype),
        "W_dec": W_dec.to(dtype),
        "b_enc": torch.zeros(d_sae, dtype=dtype),
        "b_dec": torch.zeros(W_dec.shape[1], dtype=dtype),
    }


class SAEEnsemble(nn.Module):
    """A stack of `n_members` SAEs of one architecture (see the module docstring for shapes).

    Args:
        architecture: a name of the saetool.saes registry (standard, topk, batchtopk, jumprelu, gated,
            matryoshka_batchtopk).
        d_in, d_sae: input and dictionary sizes.
        hyperparams: {name: list of n_members values}, e.g. {"l1_coefficient": [1e-4, 1e-3]} or {"k": [16, 32]};
            hyperparameters with a default (JumpReLU's bandwidth) may be omitted.
        seeds: one init seed per member (`init_member`; extra parameters start from the architecture's constants).
        tied: W_enc is W_dec^T (one shared parameter), as the original `FunctionalTiedSAE`.
        options: ensemble-wide architecture settings (Matryoshka's `matryoshka_widths`); defaults otherwise.
        decoder_norm_l1: standard only: the April 2024 recipe, L1 weighted by decoder norms
            (saetool.ensemble.recipes.decoder_weighted_l1) with NO unit-norm projection of W_dec (normalize_decoder
            does nothing); SAELens' StandardTrainingSAE loss up to the factor d_in (it sums the MSE over d_in).
        auxk_coefficient, k_aux: AuxK (Gao et al. 2024; saetool.ensemble.recipes.auxk_loss) for the top-k
            architectures: auxk_coefficient * L_aux is added to each member's loss when loss_and_stats gets a
            dead-latent mask; k_aux 0 = d_out // 2 (SAELens' default).
        d_out: a transcoder's output width (see the module docstring); None = an SAE (d_out = d_in).
        skip_connection: a transcoder's W_skip [n_members, d_out, d_in], initialised at zero.
    Raises ValueError (one line) for settings that cannot act together (tied / gated / decoder_norm_l1 transcoders,
    skip_connection without d_out, AuxK on a non-top-k architecture, missing hyperparameters).
    """

    def __init__(self, architecture: str, d_in: int, d_sae: int, hyperparams: dict[str, list[float]],
                 seeds: list[int], tied: bool = False, dtype: torch.dtype = torch.float32,
                 options: dict | None = None, decoder_norm_l1: bool = False, auxk_coefficient: float = 0.0,
                 k_aux: int = 0, d_out: int | None = None, skip_connection: bool = False):
        super().__init__()
        self.arch = get_architecture(architecture)
        self.architecture, self.d_in, self.d_sae, self.tied = architecture, d_in, d_sae, tied
        self.transcoder, self.d_out = d_out is not None, d_in if d_out is None else int(d_out)
        self.generic = is_generic(self.arch)
        check_transcoder(architecture, self.transcoder, skip_connection, tied, decoder_norm_l1)
        if tied and architecture != "standard":
            raise ValueError("tied weights apply to architecture standard only")
        if decoder_norm_l1 and architecture != "standard":
            raise ValueError("decoder_norm_l1 applies to architecture standard only")
        if auxk_coefficient and architecture not in ("topk", "batchtopk", "matryoshka_batchtopk"):
            raise ValueError("AuxK applies to the top-k architectures (topk, batchtopk, matryoshka_batchtopk)")
        self.decoder_norm_l1, self.auxk_coefficient = decoder_norm_l1, float(auxk_coefficient)
        self.k_aux = min(int(k_aux) or self.d_out // 2, d_sae)
        self.options = options_of(self.arch, d_sae, options)
        defaults = getattr(self.arch, "HYPERPARAM_DEFAULTS", {})
        hyperparams = {**{h: [v] * len(seeds) for h, v in defaults.items()}, **hyperparams}
        missing = [h for h in self.arch.HYPERPARAMS if h not in hyperparams]
        if missing:
            raise ValueError(f"architecture {architecture!r} needs hyperparameters {missing}")
        self.n_members = len(seeds)
        self.hyperparams = {h: [(int if h == "k" else float)(v) for v in hyperparams[h]] for h in self.arch.HYPERPARAMS}
        for name in self.arch.HYPERPARAMS:
            values = torch.tensor(hyperparams[name], dtype=torch.float64)
            if values.shape != (self.n_members,):
                raise ValueError(f"{name}: expected {self.n_members} values, got {list(values.shape)}")
            self.register_buffer(name, values.to(torch.long if name == "k" else dtype))
        if "k" in hyperparams and not 0 < max(hyperparams["k"]) <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {hyperparams['k']}")
        members = [init_member(d_in, d_sae, s, dtype, d_out) for s in seeds]
        stack = {k: torch.stack([m[k] for m in members]) for k in members[0]}
        self.W_dec = nn.Parameter(stack["W_dec"])
        self.W_enc_param = None if tied else nn.Parameter(stack["W_enc"])
        self.b_enc = nn.Parameter(stack["b_enc"]) if "b_enc" in getattr(self.arch, "WEIGHTS", stack) else None
        self.b_dec = nn.Parameter(stack["b_dec"])
        self.W_skip = nn.Parameter(torch.zeros(self.n_members, self.d_out, d_in, dtype=dtype)) if skip_connection else None
        self.seeds = list(seeds)
        self.extra_names: tuple[str, ...] = ()
        self.buffer_names: tuple[str, ...] = ()
        if self.generic:
            extra, buffers = self.arch.init_extra(self.n_members, d_in, d_sae, dtype)
            for name, value in extra.items():
                self.register_parameter(name, nn.Parameter(value))
            for name, value in buffers.items():
                self.register_buffer(name, value)
            self.extra_names, self.buffer_names = tuple(extra), tuple(buffers)
        self._members: slice | None = None

    @contextlib.contextmanager
    def members(self, which: slice):
        """Within this block, forward/losses/hp/weights see only the members `which` (views of the stacked
        tensors, so gradients and buffer updates land in the full stack). train_step uses it to run the autograd
        step in member groups."""
        previous, self._members = self._members, which
        try:
            yield self
        finally:
            self._members = previous

    @property
    def n_active(self) -> int:
        """Members seen now: all, or those of the `members` block."""
        return len(range(self.n_members)[self._members]) if self._members is not None else self.n_members

    @property
    def W_enc(self) -> torch.Tensor:
        """[n_members, d_in, d_sae]; a transposed view of W_dec when tied."""
        return self.W_dec.transpose(1, 2) if self.tied else self.W_enc_param

    def _active(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._members is None else t[self._members]

    def hp(self) -> dict:
        """Per-member hyperparameter buffers [n_members], the ensemble-wide options, and for k the Python int
        "k_max" (so torch.compile needs no data-dependent k.max())."""
        hp = {**{name: self._active(getattr(self, name)) for name in self.arch.HYPERPARAMS}, **self.options}
        if "k" in self.hyperparams:
            hp["k_max"] = max(self.hyperparams["k"][self._members or slice(None)])
        return hp

    def training_tensors(self) -> dict[str, torch.Tensor]:
        """Every trained tensor and architecture buffer by name, member axis first (W_enc a view when tied)."""
        names = ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip") + self.extra_names + self.buffer_names
        return {n: self._active(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def weights(self) -> dict[str, torch.Tensor]:
        """The saved-layout tensors of every member, shaped to broadcast against [n_members, batch, n]:
        matrices [n_members, a, b], vectors [n_members, 1, n] (differentiable; see saetool.saes._common); a
        transcoder's also carry "apply_b_dec_to_input": False (its input is not centred) and W_skip."""
        t = self.training_tensors()
        w = self.arch.inference_weights(t) if self.generic else t
        w = {k: v if k in ("W_enc", "W_dec", "W_skip") else v.unsqueeze(1) for k, v in w.items()}
        if self.W_skip is not None:
            w["W_skip"] = t["W_skip"]
        return {**w, "apply_b_dec_to_input": False} if self.transcoder else w

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, d_in] -> latents f [n_members, batch, d_sae] (training or inference form by `self.training`;
        a transcoder's x is its input x_in)."""
        if self.generic:
            return self.arch.encode(self.weights(), x, self.hp(), self.training)[0]
        return self.arch.activation(self._affine_pre(x), self.hp())

    def _affine_pre(self, x: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) W_enc + b_enc [n_members, batch, d_sae] (standard, topk); x W_enc + b_enc for a transcoder."""
        t = self.training_tensors()
        if self.transcoder:
            return torch.matmul(x, t["W_enc"]) + t["b_enc"].unsqueeze(1)
        return torch.baddbmm(t["b_enc"].unsqueeze(1), x.unsqueeze(0) - t["b_dec"].unsqueeze(1), t["W_enc"])

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [n_members, batch, d_sae] -> x_hat [n_members, batch, d_out] (without a transcoder's skip term)."""
        return torch.baddbmm(self._active(self.b_dec).unsqueeze(1), f, self._active(self.W_dec))

    def _skip(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """x_hat + x W_skip^T for a skip transcoder ([n_members, batch, d_out]); x_hat otherwise."""
        if self.W_skip is None:
            return x_hat
        return x_hat + torch.matmul(x, self._active(self.W_skip).transpose(1, 2))

    def forward(self, x: torch.Tensor, return_pre: bool = False):
        """x [batch, d_in] -> (x_hat [n_members, batch, d_out], f [n_members, batch, d_sae]), and with return_pre
        the pre-activations [n_members, batch, d_sae] (the loss of generic architectures and AuxK need them).
        A transcoder's x is its input x_in and x_hat its prediction of x_out (skip term included).

        In training mode (nn.Module.train) the architecture's training forward runs (BatchTopK's batch top-k)
        and its buffers are updated (BatchTopK's threshold); in eval mode the inference forward (the threshold).
        """
        if not self.generic:
            pre = self._affine_pre(x)
            f = self.arch.activation(pre, self.hp())
            x_hat = self._skip(x, self.decode(f))
            return (x_hat, f, pre) if return_pre else (x_hat, f)
        w, hp = self.weights(), self.hp()
        f, pre = self.arch.encode(w, x, hp, self.training)
        if self.training and hasattr(self.arch, "update_buffers"):
            self.arch.update_buffers({n: self._active(getattr(self, n)) for n in self.buffer_names}, f.detach(), hp)
        x_hat = self._skip(x, generic_decode(w, f))
        return (x_hat, f, pre) if return_pre else (x_hat, f)

    def losses(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, n_total: int | None = None,
               pre: torch.Tensor | None = None, x_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-member losses, each [n_members]: "mse" (mean over dims, summed over rows / n_total), "sparsity"
        (per-token penalty summed over rows / n_total), "loss" (their sum). Generic architectures (which need
        `pre` from forward(x, return_pre=True)) add their own terms, e.g. Gated's "aux", all summed into "loss".

        x is the reconstruction target (a transcoder's x_out [batch, d_out]); x_in the encoder's input (a
        transcoder's; None = x), which JumpReLU's kernel width is measured on.
        n_total defaults to the batch size (a plain mean over rows). Data-parallel training passes the GLOBAL
        batch size while x holds this rank's rows, so summing over ranks gives the exact global mean even for
        uneven shards (a mean of per-rank means would not).
        """
        n = x.shape[0] if n_total is None else n_total
        if self.generic:
            terms = self.arch.loss_terms(self.weights(), x, x_hat, f, pre, self.hp(), x_in)
            out = {name: t.sum(-1) / n for name, t in terms.items()}
            out.setdefault("sparsity", torch.zeros_like(out["mse"]))
            out["loss"] = sum(out.values())
            return out
        mse = (x_hat - x.unsqueeze(0)).pow(2).mean(-1).sum(-1) / n
        if self.decoder_norm_l1:
            sparsity = self._active(self.l1_coefficient).unsqueeze(-1) * decoder_weighted_l1(f, self._active(self.W_dec))
        else:
            sparsity = self.arch.sparsity_loss(f, self.hp())
        sparsity = sparsity.sum(-1) / n
        return {"mse": mse, "sparsity": sparsity, "loss": mse + sparsity}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder atom (row of W_dec[m]) to unit L2 norm (case T3); nothing with decoder_norm_l1
        (that recipe lets the weighted L1 control the atoms' norms)."""
        if self.decoder_norm_l1:
            return
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def set_b_dec(self, value: torch.Tensor) -> None:
        """Set b_dec of every member to `value` [d_out] (e.g. the data mean; a transcoder's: of its target); with tied
        weights this is the original's fixed centring translation, here learned."""
        self.b_dec.copy_(value.to(self.b_dec).expand_as(self.b_dec))

    def member_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights in the SAELens layout (copies): W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec,
        plus the architecture's tensors (threshold [d_sae]; Gated: b_gate, b_mag, r_mag and no b_enc) and a skip
        transcoder's W_skip [d_out, d_in]."""
        with torch.no_grad():
            t = self.training_tensors()
            w = self.arch.inference_weights(t) if self.generic else {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
            if self.W_skip is not None:
                w["W_skip"] = t["W_skip"]
        return {k: v[i].detach().clone().contiguous() for k, v in w.items()}

    def member_cfg(self, i: int) -> dict:
        """Member i's architecture part of cfg.json: the saved architecture (e.g. "jumprelu" for BatchTopK; a
        transcoder's SAELens name, saetool.saes.transcoder.saved_architecture), d_in, d_sae (a transcoder's d_out), its
        hyperparameters, the ensemble options and metadata.saetool_architecture (the trained one)."""
        saved = getattr(self.arch, "INFERENCE_ARCHITECTURE", self.architecture)
        out = {"d_out": self.d_out} if self.transcoder else {}
        if self.transcoder:
            saved = saved_architecture(self.architecture, self.W_skip is not None)
        return {"architecture": saved, "d_in": self.d_in, "d_sae": self.d_sae, **out, **self.member_hyperparams(i),
                **self.options, "metadata": {"saetool_architecture": self.architecture}}

    def member_hyperparams(self, i: int) -> dict[str, float | int]:
        """Member i's hyperparameters exactly as given (not read back from a float32 buffer, which would turn
        1e-3 into 0.0010000000474974513 as in the original tool)."""
        return {name: values[i] for name, values in self.hyperparams.items()}


def loss_and_stats(model: nn.Module, ensemble: SAEEnsemble, x: torch.Tensor, n_total: int, loss_scale: float,
                   dead: torch.Tensor | None = None, target: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + loss of every member on rows x [rows, d_in]: the part of a step that `torch.compile` fuses.
    A transcoder's x is its input x_in and `target` the same rows of x_out [rows, d_out] (None: x is the target).

    model is `ensemble` itself or its DistributedDataParallel wrapper. Returns (the scalar to backpropagate:
    the sum of member losses times loss_scale, stats): stats are [n_members] tensors normalised by n_total
    ("loss", "mse", "sparsity", "l0" = non-zero latents summed over rows / n_total), so summing them over
    data-parallel ranks gives the global batch means, and "fired" [n_members, d_sae] bool (latents non-zero on
    some row). With ensemble.auxk_coefficient and a dead mask [n_members, d_sae] (saetool.ensemble.recipes.
    DeadLatentTracker), "auxk" (its normalised MSE, with the global batch's normaliser, so the ranks' terms sum to
    the one-process value) times the coefficient is added to "loss".
    """
    x_hat, f, pre = model(x, return_pre=True)
    y = x if target is None else target
    losses = ensemble.losses(y, x_hat, f, n_total, pre, None if target is None else x)
    if ensemble.auxk_coefficient and dead is not None:
        W_dec = ensemble.training_tensors()["W_dec"]
        aux = auxk_loss(pre, dead, y.unsqueeze(0) - x_hat, W_dec, ensemble.k_aux, batch_sum=global_sum)
        losses["auxk"] = aux
        losses["loss"] = losses["loss"] + ensemble.auxk_coefficient * aux
    stats = {k: v.detach() for k, v in losses.items()}
    stats["l0"] = nonzero_count(f.detach()) / n_total
    stats["fired"] = (f.detach() != 0).any(-2)
    return losses["loss"].sum() * loss_scale, stats


def train_step(ensemble: SAEEnsemble, optimizer: torch.optim.Optimizer, x: torch.Tensor, n_total: int | None = None,
               step_fn=None, model: nn.Module | None = None, loss_scale: float = 1.0, dead: torch.Tensor | None = None,
               grad_clip_norm: float = 0.0, member_group: int = 0, target: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """One step for every member: forward, summed loss, backward, per-member gradient clipping (grad_clip_norm > 0;
    saetool.ensemble.recipes.clip_grad_norm_per_member), Adam, decoder renormalisation.

    x [rows, d_in] is this process's share of a batch of n_total rows (default: all of it). step_fn is
    `loss_and_stats` or its compiled version; model the module to call (DDP wrapper or the ensemble);
    loss_scale = world size under DDP (DDP averages gradients over ranks, our losses are already global sums);
    dead: the dead-latent mask AuxK uses (see loss_and_stats). member_group > 0 (without a DDP model): forward and
    backward run for that many members at a time (the same gradients; only one group's [group, batch, d_sae]
    intermediates are alive, which is faster on CPU, see docs/benchmarks.md).
    target: a transcoder's x_out rows [rows, d_out] (x is then x_in), see loss_and_stats.
    Returns the statistics of THIS batch computed before the update (the batch trained on), see loss_and_stats.
    """
    step_fn = step_fn or loss_and_stats
    n_total = n_total or x.shape[0]
    optimizer.zero_grad(set_to_none=True)
    if member_group and member_group < ensemble.n_members and (model is None or model is ensemble):
        parts = []
        for start in range(0, ensemble.n_members, member_group):
            which = slice(start, min(ensemble.n_members, start + member_group))
            with ensemble.members(which):
                total, part = step_fn(ensemble, ensemble, x, n_total, loss_scale,
                                      None if dead is None else dead[which], target)
                total.backward()
            parts.append(part)
        stats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    else:
        total, stats = step_fn(model or ensemble, ensemble, x, n_total, loss_scale, dead, target)
        total.backward()
    if grad_clip_norm > 0:
        clip_grad_norm_per_member(ensemble.parameters(), grad_clip_norm)
    optimizer.step()
    ensemble.normalize_decoder()
    return stats
