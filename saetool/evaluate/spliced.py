"""Spliced evaluation: the language model's own loss with each SAE's reconstruction in place of its activation.

For held-out contexts (never trained on) and every member of a sweep, the model is run with a forward hook at the
SAE's hook point that replaces the activation ``x`` by ``x_hat = sae(x)`` at every *kept* position (``mask``
True: real text tokens; BOS, separator and padding positions keep their clean activation, as they were never
trained on, the same positions generation masks out). Definitions (``ce`` = mean next-token cross-entropy in nats,
``kl`` = mean per-token KL divergence, both averaged over the *scored* positions, see below)::

    clean_ce          = ce(model)
    spliced_ce        = ce(model, x -> sae(x))
    zero_ablation_ce  = ce(model, x -> 0)
    mean_ablation_ce  = ce(model, x -> mean_kept_positions(x))       (per-dimension mean of the evaluated text)
    ce_loss_recovered = (zero_ablation_ce - spliced_ce) / (zero_ablation_ce - clean_ce)
    ce_loss_recovered_mean_ablation = (mean_ablation_ce - spliced_ce) / (mean_ablation_ce - clean_ce)
    ce_delta          = spliced_ce - clean_ce
    kl                = mean_t KL(p_clean(t) || p_spliced(t)) = mean_t sum_v p_clean[v] (log p_clean[v] - log p_spliced[v])
    zero_ablation_kl, mean_ablation_kl   the same with the ablated model in place of the spliced one
    kl_div_score      = (zero_ablation_kl - kl) / zero_ablation_kl
    perplexity        = exp(ce)                                       (the original tool's `calculate_perplexity`)

Transcoders (``sae.transcoder``: cfg ``hook_name`` = the input hook, metadata ``hook_name_out`` = the output hook)
are spliced at their OUTPUT hook: in the same forward the input hook's activation ``x_in`` is captured and the output
hook's activation is replaced by the transcoder's prediction ``sae(x_in)`` (skip term included) at the kept positions,
i.e. the MLP's output is replaced by the transcoder's computation from the MLP's input; the zero and mean ablations
replace the output hook's activation (``x_out -> 0``, ``x_out -> mean``), so ``ce_loss_recovered`` is the fraction of
the MLP's contribution to the loss that the transcoder recovers (SAELens' transcoder evaluation, sparsify
``--transcode``). The input hook is read before the output hook in a forward pass (an MLP's input precedes its
output), so the captured ``x_in`` is the clean one.

Sources: ``ce_loss_recovered`` is SAELens' ``ce_loss_score`` and SAEBench core's "CE loss recovered" (zero-ablation
baseline); ``kl`` is SAELens ``evals._kl`` (``kl_div_with_sae``, KL(original || reconstructed) summed over the
vocabulary per token) and ``kl_div_score`` SAELens' score of the same name; the mean-ablation baseline is the usual
alternative to zero ablation (e.g. SAEBench reports both baselines for attention outputs). Difference from SAELens:
SAELens zero-ablates every position (BOS included) while it splices only non-special tokens; here splice and both
ablations replace exactly the same kept positions, so the three losses are comparable.

Scored positions: the logits at position ``t`` predict token ``t + 1``; a prediction is scored when both its input
position and its target are kept text tokens, ``mask[t] & mask[t + 1]`` (no prediction of or from BOS, separator or
padding positions). Log-probabilities come from ``log_softmax`` in float32 and per-token values are summed in float64,
so identical logits give a KL of exactly 0 (``p * (lp - lp)`` is exactly 0; terms with ``p == 0`` are taken as 0, never
NaN) and an identity SAE gives ``ce_loss_recovered == 1`` exactly. Tokens are fed to the model exactly as stored, with
no attention mask, as during generation (right padding cannot affect earlier, real positions of a causal model).

One pass over the text serves all members: for every batch of contexts the clean forward is run once and then one
forward per variant (zero ablation, mean ablation, each member), each with the same batch shape (so the numerics of
an unchanged activation are bit-identical to the clean run). ``variants_per_forward > 1`` stacks several variants along
the batch axis of one forward instead (fewer, larger forwards; on the 2-core CPU with SmolLM2-135M, 4 variants per
forward took 25-35% less time than separate forwards, see docs/benchmarks.md). Rows of one batched forward were bit-identical
to a separate forward in every run here, but only the default guarantees the exact identity-SAE values above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from saetool.lm import record_activations, validate_hook_names
from saetool.saved import SparseLinearAutoencoder

__all__ = ["SPLICED_KEYS", "evaluate_spliced", "heldout_contexts", "mean_activation"]

SPLICED_KEYS = (
    "clean_ce", "spliced_ce", "zero_ablation_ce", "mean_ablation_ce", "ce_loss_recovered",
    "ce_loss_recovered_mean_ablation", "ce_delta", "kl", "zero_ablation_kl", "mean_ablation_kl", "kl_div_score",
    "clean_perplexity", "spliced_perplexity", "n_tokens", "n_contexts",
)


def heldout_contexts(store, eval_tokens: int, max_contexts: int | None = None) -> tuple[Tensor, Tensor]:
    """The store's held-out contexts: those lying entirely in its last ``eval_tokens`` rows (the rows the sweep
    never trains on), in store order.

    Args:
        store: an open :class:`saetool.store.activation_store.ActivationStore`.
        eval_tokens: rows held out at the end of the store (``SweepConfig.eval_tokens``).
        max_contexts: keep only the first ``max_contexts`` of them (None: all).

    Returns:
        ``(tokens, mask)``: int64 ``[n, context_size]`` token ids and bool ``[n, context_size]`` (False at BOS,
        separator and padding positions). ``n = n_contexts - ceil((n_rows - eval_tokens) / context_size)``, so a
        context that straddles the train/held-out boundary is never used.

    Raises:
        ValueError: no whole context lies in the held-out rows.
    """
    spec = store.spec
    c = spec.context_size
    eval_tokens = int(eval_tokens)
    first = -(-(spec.n_rows - eval_tokens) // c) if eval_tokens < spec.n_rows else 0
    last = spec.n_contexts
    if max_contexts is not None:
        last = min(last, first + int(max_contexts))
    if last <= first:
        raise ValueError(f"no whole context of {c} tokens lies in the last {eval_tokens} rows of {store.path}")
    tokens = torch.from_numpy(store.group["tokens"][first:last].astype("int64"))
    mask = torch.from_numpy(store.read_mask(first * c, last * c).reshape(last - first, c))
    return tokens, mask


def _flat(act: Tensor) -> Tensor:
    """[b, pos, d] or [b, pos, heads, d_head] -> [b, pos, d] (heads-major, as `flatten_activation`)."""
    return act.reshape(act.shape[0], act.shape[1], -1)


@torch.inference_mode()
def mean_activation(model, hook_name: str, tokens: Tensor, mask: Tensor, batch_size: int = 8) -> Tensor:
    """Per-dimension mean of the activation at ``hook_name`` over the kept positions (``mask``) of ``tokens``.

    Args:
        tokens: int ``[n, ctx]``; mask: bool ``[n, ctx]``.

    Returns:
        float64 ``[d]`` on the CPU (``d`` = flattened width, e.g. ``n_heads * d_head`` for ``attn.hook_z``).
        The forward stops after the hook's block.
    """
    total, count = None, 0
    for start in range(0, len(tokens), batch_size):
        acts = record_activations(model, tokens[start:start + batch_size], [hook_name])[hook_name]
        keep = mask[start:start + batch_size].reshape(-1).to(acts.device)
        rows = acts[keep].to(torch.float64)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += rows.shape[0]
    if not count:
        raise ValueError("mask keeps no position: nothing to average")
    return (total / count).cpu()


def _model_device(model) -> torch.device:
    device = getattr(getattr(model, "cfg", None), "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


class _Accumulator:
    """float64 sums of per-token CE and KL(clean || variant) for each variant."""

    def __init__(self, n_variants: int):
        self.ce = [0.0] * n_variants
        self.kl = [0.0] * n_variants
        self.n = 0

    def add(self, v: int, logits: Tensor, targets: Tensor, keep: Tensor, clean_lp: Tensor | None) -> Tensor:
        """Add variant v's batch; logits [b, pos, V]; returns its log-probs at the scored positions [n, V]."""
        lp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)  # [n, V]
        self.ce[v] += float(-lp.gather(1, targets[:, None]).to(torch.float64).sum())
        if clean_lp is not None:
            p = clean_lp.exp()
            kl_terms = torch.where(p > 0, p * (clean_lp - lp), torch.zeros((), dtype=lp.dtype, device=lp.device))
            self.kl[v] += float(kl_terms.sum(-1, dtype=torch.float64).sum())
        return lp


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def _output_hook(sae: SparseLinearAutoencoder) -> str | None:
    return (sae.cfg.get("metadata") or {}).get("hook_name_out")


def transcoder_input_hook(saes: Sequence[SparseLinearAutoencoder]) -> str | None:
    """The input hook shared by transcoders `saes` (None for SAEs). ValueError (one line) for a mix of SAEs and
    transcoders, transcoders of different input hooks, or a transcoder whose cfg lacks metadata.hook_name_out."""
    kinds = {bool(getattr(s, "transcoder", False)) for s in saes}
    if kinds == {False}:
        return None
    if len(kinds) > 1:
        raise ValueError("evaluate_spliced: SAEs and transcoders are spliced at different hooks; evaluate them apart")
    inputs = {s.cfg.get("hook_name") for s in saes}
    if len(inputs) != 1 or None in inputs or any(_output_hook(s) is None for s in saes):
        raise ValueError(f"transcoders need one input hook (cfg hook_name, got {sorted(map(str, inputs))}) and "
                         "metadata.hook_name_out")
    return inputs.pop()


@torch.inference_mode()
def evaluate_spliced(
    model,
    saes: Sequence[SparseLinearAutoencoder],
    tokens: Tensor,
    mask: Tensor | None = None,
    hook_name: str | None = None,
    batch_size: int = 8,
    mean: Tensor | None = None,
    variants_per_forward: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """CE / KL of ``model`` with each SAE spliced in at its hook, plus the clean and ablated baselines.

    Args:
        model: a ``TransformerBridge`` (:func:`saetool.lm.models.load_model`) in eval mode.
        saes: the members to evaluate (any device/dtype; inputs are cast to the SAE's dtype and the reconstruction
            back to the model's). All must read the same hook; transcoders all the same input and output hooks.
        tokens: int ``[n_contexts, ctx]`` held-out token ids (:func:`heldout_contexts`), fed exactly as given.
        mask: bool ``[n_contexts, ctx]``, True at real text tokens (default: all True but position 0).
        hook_name: hook to splice at (default: the members' ``cfg["hook_name"]``, a transcoder's output hook
            ``cfg["metadata"]["hook_name_out"]``; see the module docstring). ``attn.hook_z``-style per-head
            hooks ``[b, pos, heads, d_head]`` are flattened heads-major for the SAE and reshaped back.
        batch_size: contexts per forward (per variant).
        mean: float ``[d]`` activation mean for mean ablation (default: :func:`mean_activation` over the kept
            positions of ``tokens``, a short extra pass that stops after the hook's block).
        variants_per_forward: how many of the ``2 + len(saes)`` non-clean variants share one forward (stacked on
            the batch axis). 1 (default) keeps every forward at the clean forward's exact shape.
        log: optional callable for one timing line.

    Returns:
        One dict per SAE, in order, with the float keys of :data:`SPLICED_KEYS` (see the module docstring for every
        formula) and the ints ``n_tokens`` (scored predictions) and ``n_contexts``. The baselines (clean, zero and
        mean ablation) are the same in every dict.

    Raises:
        ValueError: no SAE, SAEs on different hooks or of the wrong width, an unknown hook, bad shapes, or a mask
            that scores no prediction.
    """
    saes = list(saes)
    if not saes:
        raise ValueError("evaluate_spliced needs at least one SAE")
    input_hook = transcoder_input_hook(saes)
    hook_name = _splice_hook(saes, hook_name, input_hook)
    validate_hook_names(model, [hook_name] if input_hook is None else [input_hook, hook_name])
    mask, scored = _checked_mask(tokens, mask)
    if mean is None:
        mean = mean_activation(model, hook_name, tokens, mask, batch_size)
    d = int(mean.shape[-1])
    for s in saes:
        if s.d_out != d:
            raise ValueError(f"{s!r} has d_{'out' if input_hook else 'in'} {s.d_out} but {hook_name} has width {d}")
    start_time = time.perf_counter()
    acc, forwards = _spliced_forwards(model, saes, tokens, mask, scored, hook_name, input_hook, mean, batch_size,
                                      max(1, int(variants_per_forward)))
    if log is not None:
        log(f"spliced evaluation at {hook_name}: {len(saes)} SAEs, {len(tokens)} contexts, {acc.n} scored tokens, "
            f"{forwards} forwards in {time.perf_counter() - start_time:.1f} s")
    return _spliced_results(acc, len(saes), len(tokens))


def _splice_hook(saes: list, hook_name: str | None, input_hook: str | None) -> str:
    """The hook to splice at: `hook_name`, else the one hook the members name (an SAE's cfg hook_name, a
    transcoder's output hook). ValueError when they name none or several."""
    if hook_name is None:
        names = {s.cfg.get("hook_name") if input_hook is None else _output_hook(s) for s in saes}
        if len(names) != 1 or None in names:
            raise ValueError(f"pass hook_name: the SAEs name the hooks {sorted(map(str, names))}")
        hook_name = names.pop()
    return hook_name


def _checked_mask(tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(mask, scored): the bool mask of kept positions (default: all but position 0) and ``scored`` [n, ctx - 1],
    the predictions scored (both positions kept). ValueError for bad shapes or a mask that scores nothing."""
    if tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(f"tokens must be an integer tensor [n_contexts, ctx], got {tuple(tokens.shape)}")
    if mask is None:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False
    if mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    if tokens.shape[1] < 2:
        raise ValueError("contexts need at least 2 tokens to score a next-token prediction")
    mask = mask.to(torch.bool)
    scored = mask[:, :-1] & mask[:, 1:]
    if not scored.any():
        raise ValueError("the mask scores no prediction (needs two consecutive kept positions)")
    return mask, scored


def _spliced_forwards(model, saes: list, tokens: Tensor, mask: Tensor, scored: Tensor, hook_name: str,
                      input_hook: str | None, mean: Tensor, batch_size: int, group: int) -> tuple[_Accumulator, int]:
    """Run every variant over the contexts and accumulate CE/KL: variant 0 clean (no hook), 1 zero ablation,
    2 mean ablation, 3 + i SAE i spliced at the kept positions; `group` non-clean variants share one forward.
    Returns the accumulator and the number of forwards."""
    device = _model_device(model)
    captured: list[Tensor] = []  # a transcoder's input activation of the current forward

    def replacement(v: int, x: Tensor, x_in: Tensor) -> Tensor:
        """x [b, pos, d] (x_in: the input hook's rows of the same contexts, x itself for an SAE) -> what variant v
        puts at the kept positions (same dtype/device as x)."""
        if v == 1:
            return torch.zeros_like(x)
        if v == 2:
            return mean.to(device=x.device, dtype=x.dtype).expand_as(x)
        sae = saes[v - 3]
        return sae(x_in.to(sae.W_enc.device)).to(device=x.device, dtype=x.dtype)

    def capture(act: Tensor, hook=None) -> Tensor:
        captured[:] = [_flat(act)]
        return act

    n_variants = 3 + len(saes)
    acc, forwards = _Accumulator(n_variants), 0
    for start in range(0, len(tokens), batch_size):
        tok = tokens[start:start + batch_size].to(device=device, dtype=torch.long)
        msk = mask[start:start + batch_size].to(device)
        keep = scored[start:start + batch_size].to(device)
        if not keep.any():
            continue
        targets = tok[:, 1:][keep]
        b = tok.shape[0]
        clean_lp = acc.add(0, model(tok, return_type="logits"), targets, keep, None)
        forwards += 1
        for first in range(1, n_variants, group):
            variants = list(range(first, min(first + group, n_variants)))
            g = len(variants)
            splice_at = msk.repeat(g, 1)[..., None]  # [g*b, pos, 1]

            def hook(act: Tensor, hook=None, variants=variants, splice_at=splice_at, b=b) -> Tensor:
                flat = _flat(act)
                x_in = captured[0] if input_hook is not None else flat
                new = torch.cat([replacement(v, flat[j * b:(j + 1) * b], x_in[j * b:(j + 1) * b])
                                 for j, v in enumerate(variants)])
                return torch.where(splice_at, new, flat).reshape(act.shape)

            hooks = [(hook_name, hook)] if input_hook is None else [(input_hook, capture), (hook_name, hook)]
            logits = model.run_with_hooks(tok.repeat(g, 1), fwd_hooks=hooks, return_type="logits")
            forwards += 1
            for j, v in enumerate(variants):
                acc.add(v, logits[j * b:(j + 1) * b], targets, keep, clean_lp)
            del logits
        acc.n += int(keep.sum())
    return acc, forwards


def _spliced_results(acc: _Accumulator, n_saes: int, n_contexts: int) -> list[dict]:
    """One dict of SPLICED_KEYS (plus n_tokens, n_contexts) per SAE from the accumulated CE/KL sums."""
    n = acc.n
    clean, zero, mean_ce = acc.ce[0] / n, acc.ce[1] / n, acc.ce[2] / n
    zero_kl, mean_kl = acc.kl[1] / n, acc.kl[2] / n
    results = []
    for i in range(n_saes):
        spliced, kl = acc.ce[3 + i] / n, acc.kl[3 + i] / n
        results.append({
            "clean_ce": clean,
            "spliced_ce": spliced,
            "zero_ablation_ce": zero,
            "mean_ablation_ce": mean_ce,
            "ce_loss_recovered": _ratio(zero - spliced, zero - clean),
            "ce_loss_recovered_mean_ablation": _ratio(mean_ce - spliced, mean_ce - clean),
            "ce_delta": spliced - clean,
            "kl": kl,
            "zero_ablation_kl": zero_kl,
            "mean_ablation_kl": mean_kl,
            "kl_div_score": _ratio(zero_kl - kl, zero_kl),
            "clean_perplexity": math.exp(clean),
            "spliced_perplexity": math.exp(spliced),
            "n_tokens": n,
            "n_contexts": n_contexts,
        })
    return results

