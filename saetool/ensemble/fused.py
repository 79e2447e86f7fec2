"""The fused ensemble step: forward, loss and hand-derived backward of every member, without autograd.

For member m (shapes without the member axis; x [B, d_in], n = global batch size, D = d_in):

    pre   = x W_enc + (b_enc - b_dec W_enc)             [B, d_sae]   (= (x - b_dec) W_enc + b_enc)
    f     = act(pre)                                    ReLU, or ReLU of the top-k (saetool.saes)
    x_hat = f W_dec + b_dec                             [B, D]
    loss  = sum (x_hat - x)^2 / (n D) + l1 * sum f / n  (f >= 0, so sum f = sum |f|)
            (decoder_norm_l1: l1 * sum_{b,i} f_bi r_i / n with r_i = ||W_dec_i||, so g_f gets l1 r_i / n and
            dW_dec_i gets l1 (sum_b f_bi) / n * W_dec_i / r_i)

    g_xhat  = 2 (x_hat - x) / (n D)
    dW_dec  = f^T g_xhat                 db_dec  = sum_rows g_xhat - (sum_rows g_pre) W_enc^T
    g_f     = g_xhat W_dec^T + l1 / n    g_pre   = g_f * [f > 0]     (the ReLU / kept-top-k mask)
    dW_enc  = x^T g_pre - b_dec^T (sum_rows g_pre)                   db_enc = sum_rows g_pre
    tied (W_enc = W_dec^T): dW_dec += dW_enc^T

Transcoders (x = x_in [B, d_in], target y = x_out [B, D = d_out], input not centred, optional W_skip [D, d_in]):
    pre = x W_enc + b_enc     x_hat = f W_dec + b_dec + x W_skip^T     loss as above with y in place of x
    db_dec = sum_rows g_xhat  dW_enc = x^T g_pre   dW_skip = g_xhat^T x  (no b_dec terms in the encoder)
so one more matmul pair per member for the skip term (2 B D d_in FLOPs each way).

This is exactly the gradient autograd computes (tested against it and against separately trained
plain-PyTorch SAEs), with three savings: (1) b_dec is folded into the encoder bias, so no gradient w.r.t. the
centred input is formed: five matmuls per member (10 B D d_sae FLOPs) instead of six; (2) members are
processed in groups of `group_size`, so only [group, B, d_sae] intermediates are alive at once (the memory
traffic of one [n_members, B, d_sae] stack made a single big bmm slower than a loop on CPU); (3) buffers are
reused in place and no autograd graph is built. The elementwise parts (mask, bias, L1 term) are cheap next
to the five matmuls; `torch.compile` can fuse them further.

bf16 compute (compute_dtype=torch.bfloat16; None keeps the fp32 path above unchanged). The five big matmuls take
bf16 operands; torch's bf16 matmuls accumulate in fp32 internally and round their result to bf16:
    bf16: x (cast once per call), W_enc[g] / W_dec[g] (cast once per member group; tied: W_enc = W_dec^T of the
          bf16 copy), pre (x W_enc, plus the folded bias added in bf16), f, x_hat as the decoder matmul returns
          it, g_xhat's bf16 copy (the operand of dW_dec and g_f), g_f / g_pre (l1 term added and mask applied in
          bf16), and the raw results of dW_dec = f^T g_xhat and x^T g_pre before their upcast.
    fp32: the master weights and biases, the folded bias b_enc - b_dec W_enc, e = x_hat - x (x_hat upcast, b_dec
          added in fp32) and g_xhat, the statistics (mse, l0, sparsity, loss, fired), sum_rows f and sum_rows g_pre
          (bf16 inputs summed with fp32 accumulation), the decoder norms and every gradient written to `.grad`
          (matmul results upcast, then the b_dec / L1-norm corrections applied in fp32).
So only [G, B, D]-sized tensors are converted (x_hat up, g_xhat down); the [G, B, d_sae] ones stay bf16.
Folding b_dec into the bias makes pre = x W_enc - b_dec W_enc a difference of two terms: in bf16 its error is
~2^-8 |x W_enc|, not |pre|, so an input whose mean is much larger than its spread loses relative precision
(centre the data, e.g. saetool's b_dec init from the data mean does not remove it from x).
"""

from __future__ import annotations

import torch

from saetool.ensemble.recipes import nonzero_count
from saetool.ensemble.stack import SAEEnsemble
from saetool.saes import FUSED_ARCHITECTURES


@torch.no_grad()
def fused_loss_and_grads(ensemble: SAEEnsemble, x: torch.Tensor, n_total: int, group_size: int,
                         grad_scale: float = 1.0, compute_dtype: torch.dtype | None = None,
                         target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Write every member's gradient into the parameters' `.grad` and return the batch statistics.

    x: this process's rows [rows, d_in] (float32, or the ensemble's dtype); n_total: the global batch size the
    losses are normalised by (see SAEEnsemble.losses); group_size: members per batched matmul.
    compute_dtype: None (the parameters' dtype throughout) or torch.bfloat16: the five big matmuls take bf16
    operands (see the module docstring); gradients, statistics and parameters stay in the parameters' dtype.
    target: a transcoder's x_out rows [rows, d_out] (x is then x_in); None for an SAE.
    Returns {"loss", "mse", "sparsity", "l0"} each [n_members] (normalised by n_total) and "fired" [n_members,
    d_sae], as loss_and_stats.
    Raises ValueError for architectures without a fused kernel, or AuxK (use the autograd path).
    """
    if ensemble.architecture not in FUSED_ARCHITECTURES:
        raise ValueError(f"no fused kernel for architecture {ensemble.architecture!r}")
    if ensemble.auxk_coefficient:
        raise ValueError("the fused kernel has no AuxK; use the autograd path")
    W_enc, W_dec, b_enc, b_dec = ensemble.W_enc, ensemble.W_dec, ensemble.b_enc, ensemble.b_dec
    W_skip, tc = ensemble.W_skip, ensemble.transcoder
    params = [W_dec, b_enc, b_dec] + ([] if ensemble.tied else [ensemble.W_enc_param])
    params += [] if W_skip is None else [W_skip]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    gW_dec, gb_enc, gb_dec = W_dec.grad, b_enc.grad, b_dec.grad
    gW_enc = None if ensemble.tied else ensemble.W_enc_param.grad
    N, d = ensemble.n_members, ensemble.d_out
    y = x if target is None else target
    hp = ensemble.hp()
    l1 = hp.get("l1_coefficient")
    stats = {k: x.new_zeros(N, dtype=torch.float32) for k in ("mse", "sparsity", "l0")}
    fired = torch.zeros(N, ensemble.d_sae, dtype=torch.bool, device=x.device)
    low = compute_dtype is not None and compute_dtype != W_dec.dtype
    if low:
        x, y = x.to(W_dec.dtype), y.to(W_dec.dtype)                                          # the fp32 target
        x_lo = x.to(compute_dtype)                                                           # once per call
        xt = x_lo.t()
    else:
        x_lo, xt = x, x.t()
    for g0 in range(0, N, group_size):
        g = slice(g0, min(N, g0 + group_size))
        We, Wd, bd = W_enc[g], W_dec[g], b_dec[g]
        bias = b_enc[g] if tc else b_enc[g] - torch.bmm(bd.unsqueeze(1), We).squeeze(1)    # [G, S]
        group_hp = {k: v[g] for k, v in hp.items() if torch.is_tensor(v)}
        if "k" in group_hp:
            group_hp["k_max"] = max(ensemble.hyperparams["k"][g])
        if low:
            Wd_lo = Wd.to(compute_dtype)                                                     # once per group
            We_lo = Wd_lo.transpose(1, 2) if ensemble.tied else We.to(compute_dtype)
            pre = torch.matmul(x_lo, We_lo).add_(bias.to(compute_dtype).unsqueeze(1))       # bf16 [G, B, S]
            f = ensemble.arch.activation(pre, group_hp)                                      # bf16
            del pre
            e = torch.bmm(f, Wd_lo).float().add_(bd.unsqueeze(1))                           # fp32 [G, B, D]
            if W_skip is not None:
                e.add_(torch.matmul(x_lo, W_skip[g].to(compute_dtype).transpose(1, 2)).float())
            e.sub_(y)
        else:
            pre = torch.matmul(x, We).add_(bias.unsqueeze(1))                               # [G, B, S]
            f = ensemble.arch.activation(pre, group_hp)
            del pre
            e = torch.baddbmm(bd.unsqueeze(1), f, Wd)                                      # x_hat [G, B, D]
            if W_skip is not None:
                e.add_(torch.matmul(x, W_skip[g].transpose(1, 2)))
            e.sub_(y)                                                                      # x_hat - y
        stats["mse"][g] = e.pow(2).sum((1, 2)) / (n_total * d)
        active = f > 0
        stats["l0"][g] = nonzero_count(f) / n_total
        fired[g] = active.any(1)
        # the L1 weight of latent i: 1, or ||W_dec_i|| with decoder_norm_l1
        norms = Wd.norm(dim=-1) if ensemble.decoder_norm_l1 else None                      # [G, S]
        if l1 is not None:
            f_sum = f.sum(1, dtype=Wd.dtype)                                                 # [G, S]
            weighted = f_sum if norms is None else f_sum * norms
            stats["sparsity"][g] = l1[g] * weighted.sum(-1) / n_total
        g_xhat = e.mul_(2.0 * grad_scale / (n_total * d))
        if low:
            g_xhat_lo = g_xhat.to(compute_dtype)
            gW_dec[g] = torch.bmm(f.transpose(1, 2), g_xhat_lo)                              # bf16 -> fp32
            del f
            g_pre = torch.bmm(g_xhat_lo, Wd_lo.transpose(1, 2))                              # bf16 g_f
            del g_xhat_lo
        else:
            torch.bmm(f.transpose(1, 2), g_xhat, out=gW_dec[g])                              # written in place
            del f
            g_pre = torch.bmm(g_xhat, Wd.transpose(1, 2))                                   # g_f [G, B, S]
        if l1 is not None:
            c = (l1[g] * (grad_scale / n_total)).view(-1, 1)                                 # [G, 1]
            g_pre.add_((c if norms is None else c * norms).unsqueeze(1).to(g_pre.dtype))
            if norms is not None:  # d/dW_dec_i of l1 sum_b f_bi ||W_dec_i|| / n
                gW_dec[g] += (c * f_sum / norms.clamp_min(1e-12)).unsqueeze(-1) * Wd
        g_pre.masked_fill_(active.logical_not_(), 0)                                        # no float mask copy
        del active
        s = g_pre.sum(1, dtype=Wd.dtype)                                                     # [G, S]
        if low or gW_enc is None:
            dW_enc = torch.matmul(xt, g_pre).to(Wd.dtype)                                    # [G, d_in, S]
        else:  # written in place into the gradient
            dW_enc = torch.matmul(xt, g_pre, out=gW_enc[g])
        del g_pre
        gb_enc[g] = s
        if tc:
            gb_dec[g] = g_xhat.sum(1)
        else:
            dW_enc.sub_(bd.unsqueeze(2) * s.unsqueeze(1))
            gb_dec[g] = g_xhat.sum(1) - torch.bmm(s.unsqueeze(1), We.transpose(1, 2)).squeeze(1)
        if W_skip is not None:  # dW_skip = g_xhat^T x [G, D, d_in]
            g_lo = g_xhat.to(compute_dtype) if low else g_xhat
            W_skip.grad[g] = torch.matmul(g_lo.transpose(1, 2), x_lo).to(Wd.dtype)
        if gW_enc is None:
            gW_dec[g] += dW_enc.transpose(1, 2)
        elif low:
            gW_enc[g] = dW_enc
        del e, g_xhat, dW_enc  # not alive into the next group's encode
        if low:
            del Wd_lo, We_lo
    stats["loss"] = stats["mse"] + stats["sparsity"]
    stats["fired"] = fired
    return stats
