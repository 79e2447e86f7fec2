"""One streaming pass that collects what the feature browser shows for every member and latent.

For each member of a sweep and each latent ``i`` (of the first ``n_latents``), over the evaluated rows (the store's
held-out rows by default):

* **top activations**: the ``top`` positions with the largest activation ``f_i > 0`` (ties: any order), each with
  its context window, ``before`` tokens before and ``after`` tokens after the position, clipped to the position's
  context and to the evaluated rows, and the latent's activation at every token of the window;
* **quantile samples**: a uniform random sample of ``samples`` firing positions (the ``samples`` firing positions
  with the smallest :func:`sample_keys`, a fixed hash of the row: reproducible, and one pass suffices), with
  their windows; :func:`quantile_groups` sorts them by activation and splits them into groups (the lowest fifth,
  the next fifth, ...), so each group shows contexts from one quantile band of the latent's activation
  distribution. SAEDashboard instead samples equal-width intervals of ``[0, max]``; those need the final maximum
  before the pass (a second pass), which this one-pass, bounded-memory form avoids;
* **activation histogram**: counts of the firing activations in the fixed bins of :data:`HIST_EDGES`
  (``log10 f`` from -3 to 3 in steps of 0.1: bin ``clamp(floor(10 (log10 f + 3)) + 1, 0, 61)``, so bin 0 counts
  ``f < 1e-3`` and bin 61 ``f >= 1e3``), the same edges for every latent;
* **firing density**: the fraction of evaluated (kept) tokens on which ``f_i != 0`` (the convention of
  :class:`saetool.evaluate.metrics.FiringCounter`, so it equals the report's density).

Positions the store masks out (BOS, separators, padding) are never encoded or counted; inside a window they show
activation 0 and ``kept`` False. Memory per member: ``n_latents * (top + samples) * (before + 1 + after)`` float32
window values plus small per-latent arrays (``O(members x latents x N)``; no activation is kept beyond its batch).
The buffers are merged per batch from the batch's non-zero activations only (sparse); slots stay unordered until
the end and only candidates that enter a buffer have their window gathered, so once the buffers are full the extra
work per batch grows with the firings that beat a latent's current K-th entry (about ``K ln(firings / K)`` per
latent over a whole pass), not with ``tokens x latents``; what every batch pays is one scan of ``f`` for its
non-zeros (the histogram and the density need each one) and a few operations per non-zero. The cost against the
evaluation pass is measured by ``benchmarks/bench_browser.py`` (docs/report.md, "The feature browser"; docs/benchmarks.md).

Token ids of the windows are read from the store's ``tokens`` array once, after the pass, for the contexts that
the kept windows reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["HIST_EDGES", "FeatureCollector", "LatentWindows", "quantile_groups", "sample_keys"]

HIST_EDGES = np.round(np.linspace(-3.0, 3.0, 61), 10)  # log10 activation; 60 bins + under/overflow bins
_INT64_MAX = torch.iinfo(torch.int64).max
_M32 = 0xFFFFFFFF


def sample_keys(rows: Tensor, seed: int = 0) -> Tensor:
    """The random key of each store row: int64 in ``[0, 2**62)``, a fixed function of the row and ``seed``.

    The high 32 bits are a 32-bit integer hash (the "lowbias32" mixer: xor-shift 16, multiply 0x7feb352d,
    xor-shift 15, multiply 0x846ca68b, xor-shift 16) of ``row * 0x9E3779B1 + seed``; the low 30 bits are
    ``row mod 2**30``, which breaks ties between equal hashes. For every latent, its firing positions with the
    smallest keys form a uniform random sample of its firing positions (the keys are independent of the latent, so
    one key per row serves every latent and one dense comparison finds the candidates).
    """
    x = (rows.to(torch.int64) * 0x9E3779B1 + int(seed)) & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x << 30) | (rows.to(torch.int64) & ((1 << 30) - 1))


@dataclass
class LatentWindows:
    """Kept positions of one member, ``[n_latents, K]`` each (K = top or samples), slots sorted best first.

    ``score`` is the ordering key (activation for the top buffer, minus the random key for the samples), ``value``
    the activation at the position, ``row`` the store row (-1: empty slot), ``window`` float32 ``[n_latents, K, W]``
    the activations of the window's tokens and ``window_row`` int64 ``[n_latents, K, W]`` their store rows (-1:
    outside the context or the evaluated rows)."""

    score: Tensor
    value: Tensor
    row: Tensor
    window: Tensor
    window_row: Tensor


class FeatureCollector:
    """Running top-N and sample buffers, histograms and firing counts of several members (see the module docstring).

    Args:
        d_sae: latents of each member (list, one per member); only the first ``n_latents`` of each are collected.
        context_size: the store's context size (windows never cross a context boundary).
        top: top activations kept per latent (N).
        samples: random firing positions kept per latent for the quantile groups.
        before, after: window tokens before and after the position.
        n_latents: collect latents ``[0, n_latents)`` (None: all).
        device: where the buffers live (the encoder's device).
        seed: of :func:`sample_keys`.
    """

    def __init__(self, d_sae: list[int], context_size: int, top: int = 20, samples: int = 25, before: int = 24,
                 after: int = 8, n_latents: int | None = None, device: str | torch.device = "cpu", seed: int = 0):
        if top < 1 or samples < 0 or before < 0 or after < 0:
            raise ValueError("top must be >= 1 and samples, before, after >= 0")
        self.context_size, self.top, self.samples = int(context_size), int(top), int(samples)
        self.before, self.after, self.seed = int(before), int(after), int(seed)
        self.device = torch.device(device)
        self.n_latents = [int(d if n_latents is None else min(d, n_latents)) for d in d_sae]
        self.offsets = torch.arange(-self.before, self.after + 1, device=self.device)
        self.top_buf = [self._empty(n, self.top, torch.float32) for n in self.n_latents]
        self.sample_buf = [self._empty(n, self.samples, torch.int64) for n in self.n_latents]
        n_bins = len(HIST_EDGES) + 1
        self.hist = [torch.zeros(n, n_bins, dtype=torch.int64, device=self.device) for n in self.n_latents]
        self.fired = [torch.zeros(n, dtype=torch.int64, device=self.device) for n in self.n_latents]
        self.n_tokens = [0] * len(self.n_latents)

    def _empty(self, n: int, k: int, score_dtype: torch.dtype) -> LatentWindows:
        w = len(self.offsets)
        low = -torch.inf if score_dtype.is_floating_point else torch.iinfo(score_dtype).min
        return LatentWindows(
            score=torch.full((n, k), low, dtype=score_dtype, device=self.device),
            value=torch.zeros(n, k, device=self.device), row=torch.full((n, k), -1, dtype=torch.int64,
                                                                          device=self.device),
            window=torch.zeros(n, k, w, device=self.device),
            window_row=torch.full((n, k, w), -1, dtype=torch.int64, device=self.device))

    @torch.no_grad()
    def update(self, member: int, start: int, keep: Tensor, f: Tensor) -> None:
        """Add one batch of one member.

        Args:
            member: the member's index.
            start: the store row of the batch's first row; a batch must hold rows ``[start, start + len(keep))``
                whose inner context boundaries are those of :func:`saetool.evaluate.heldout.context_batches`.
            keep: bool ``[B]``, the store's mask of the batch (False: not encoded).
            f: ``[keep.sum(), d_sae]`` the member's latents at the kept rows, in row order (any float dtype).
        """
        n = self.n_latents[member]
        keep = keep.to(self.device)
        f = f[:, :n].to(self.device, torch.float32).contiguous()
        self.n_tokens[member] += f.shape[0]
        flat = _nonzero_flat(f)  # the non-zeros, row-major: (row of f) * n + latent
        if flat.numel() == 0:
            return
        frow, lat = flat // n, flat % n
        val = f.view(-1).index_select(0, flat)
        self.fired[member] += torch.bincount(lat, minlength=n)
        n_bins = self.hist[member].shape[1]
        b = (torch.floor(10 * (torch.log10(val.clamp_min(1e-30).double()) - HIST_EDGES[0])) + 1).clamp(0, n_bins - 1)
        self.hist[member] += torch.bincount(lat * n_bins + b.long(), minlength=n * n_bins).reshape(n, n_bins)
        kept_rows = keep.nonzero()[:, 0]  # batch row of each row of f
        slot = torch.full((len(keep),), -1, dtype=torch.int64, device=self.device)  # batch row -> row of f
        slot[kept_rows] = torch.arange(len(kept_rows), device=self.device)
        ctx = (start, slot, f)
        # Prefilters on the non-zeros: only positions that beat their latent's current K-th entry become candidates,
        # so once the buffers are full a batch yields few candidates (activations are >= 0 for every architecture).
        top = self.top_buf[member]
        sel = (val > top.score.min(dim=1).values.clamp_min(0).index_select(0, lat)).nonzero()[:, 0]
        if sel.numel():
            cand_val = val.index_select(0, sel)
            self._merge(top, lat.index_select(0, sel), kept_rows.index_select(0, frow.index_select(0, sel)),
                        cand_val, cand_val, ctx)
        if self.samples:
            smp = self.sample_buf[member]
            row_score = -sample_keys(kept_rows + start, self.seed)  # [n_kept]: higher = earlier in the sample
            score = row_score.index_select(0, frow)
            sel = (score > smp.score.min(dim=1).values.index_select(0, lat)).nonzero()[:, 0]
            if sel.numel():
                r = frow.index_select(0, sel)
                self._merge(smp, lat.index_select(0, sel), kept_rows.index_select(0, r), score.index_select(0, sel),
                            val.index_select(0, sel), ctx)

    def _merge(self, buf: LatentWindows, lat: Tensor, brow: Tensor, score: Tensor, val: Tensor, ctx) -> None:
        """Merge the candidates (latent, batch row, score, value), each better than its latent's current K-th
        score, into ``buf`` in place, keeping the K best scores per latent. Slots are unordered until
        :meth:`result`: a candidate that enters takes the slot of an entry it evicts, and only entering candidates
        have their windows gathered, so the work per batch grows with the candidates, not with latents x K x W.
        Indexing is flat (``index_select``/``index_copy_`` on 1-D views), much cheaper on CPU than advanced
        indexing."""
        k = buf.score.shape[1]
        order = torch.argsort(score, descending=True, stable=True)
        order = order.index_select(0, torch.argsort(lat.index_select(0, order), stable=True))  # by latent, best first
        lat, brow, score, val = (a.index_select(0, order) for a in (lat, brow, score, val))
        rank = torch.arange(len(lat), device=lat.device) - torch.searchsorted(lat, lat)
        sel = (rank < k).nonzero()[:, 0]
        lat, brow, score, val, rank = (a.index_select(0, sel) for a in (lat, brow, score, val, rank))
        touched, u = torch.unique_consecutive(lat, return_inverse=True)
        cell = u * k + rank  # the candidate's cell in [len(touched), K]
        low = -torch.inf if score.dtype.is_floating_point else torch.iinfo(score.dtype).min
        cand = torch.full((len(touched) * k,), low, dtype=score.dtype, device=score.device)
        cand.index_copy_(0, cell, score)
        both = torch.cat([buf.score.index_select(0, touched), cand.view(-1, k)], dim=1)
        best = torch.topk(both, k, dim=1).indices  # [T, K]
        old_kept = torch.zeros(len(touched), k, dtype=torch.int64, device=lat.device)
        new_in = torch.zeros_like(old_kept)
        old_kept.scatter_add_(1, best.clamp(max=k - 1), (best < k).long())
        new_in.scatter_add_(1, (best - k).clamp(min=0), (best >= k).long())
        evict = (old_kept.view(-1) == 0).nonzero()[:, 0]  # ascending: row t's evicted slots pair with its entrants
        enter = (new_in.view(-1) > 0).nonzero()[:, 0]
        which = torch.full((len(touched) * k,), -1, dtype=torch.int64, device=lat.device)
        which.index_copy_(0, cell, torch.arange(len(lat), device=lat.device))
        idx = which.index_select(0, enter)  # candidates that enter (-1: an empty slot won a tie of empties)
        dest = touched.index_select(0, evict // k) * k + evict % k  # flat slot in [n_latents * K]
        if not bool((idx >= 0).all()):
            empty = (idx < 0).nonzero()[:, 0]
            buf.score.view(-1).index_fill_(0, dest.index_select(0, empty), low)
            buf.row.view(-1).index_fill_(0, dest.index_select(0, empty), -1)
            full = (idx >= 0).nonzero()[:, 0]
            dest, idx = dest.index_select(0, full), idx.index_select(0, full)
        lat, brow, score, val = (a.index_select(0, idx) for a in (lat, brow, score, val))
        start = ctx[0]
        buf.score.view(-1).index_copy_(0, dest, score)
        buf.value.view(-1).index_copy_(0, dest, val)
        buf.row.view(-1).index_copy_(0, dest, brow + start)
        window, window_row = self._windows(lat, brow, ctx)
        buf.window.view(-1, window.shape[1]).index_copy_(0, dest, window)
        buf.window_row.view(-1, window.shape[1]).index_copy_(0, dest, window_row)

    def _windows(self, lat: Tensor, brow: Tensor, ctx) -> tuple[Tensor, Tensor]:
        """The windows of positions (latent, batch row) ``[E]``: the latent's activations ``[E, W]`` (0 outside
        the context or at rows not kept) and the store rows ``[E, W]`` (-1 outside the context or the batch)."""
        start, slot, f = ctx
        c, n_rows = self.context_size, len(slot)
        first = (brow + start) // c * c - start  # batch row of the position's context start
        lo, hi = first.clamp_min(0), (first + c).clamp_max(n_rows)  # the context, clipped to the batch
        win = brow[:, None] + self.offsets  # batch rows of each window
        inside = (win >= lo[:, None]) & (win < hi[:, None])
        win = win.clamp(0, n_rows - 1)
        frow = slot.index_select(0, win.view(-1)).view(win.shape)  # row of f, -1: not kept
        n = f.shape[1]
        act = f.view(-1).index_select(0, (frow.clamp_min(0) * n + lat[:, None]).view(-1)).view(win.shape)
        return torch.where(inside & (frow >= 0), act, 0.0), torch.where(inside, win + start, -1)

    def result(self, member: int) -> dict:
        """The collected data of one member as NumPy arrays (``n`` = n_latents, W = window length):

        ``density`` float64 [n] (fired / n_tokens; 0 when no token was evaluated), ``fired`` int64 [n],
        ``n_tokens``, ``max_activation`` float32 [n] (0 for a latent that never fired), ``hist`` int64
        [n, 62] (bins of :data:`HIST_EDGES`), and for ``top`` and ``samples`` a dict of ``value`` [n, K],
        ``row`` [n, K] (-1 empty), ``window`` float32 [n, K, W], ``window_row`` int64 [n, K, W] (-1: none)
        with the slots of the top buffer sorted by activation (largest first) and the samples by key.
        """
        fired = self.fired[member].cpu().numpy()
        n_tok = self.n_tokens[member]
        top, samples = (_sorted(b) for b in (self.top_buf[member], self.sample_buf[member]))
        out = {"fired": fired, "n_tokens": n_tok, "density": fired / n_tok if n_tok else np.zeros(len(fired)),
               "hist": self.hist[member].cpu().numpy(),
               "max_activation": top.value[:, 0].cpu().numpy()}
        for name, buf in (("top", top), ("samples", samples)):
            out[name] = {a: getattr(buf, a).cpu().numpy() for a in ("value", "row", "window", "window_row")}
        return out


def _nonzero_flat(f: Tensor) -> Tensor:
    """The flat indices of the non-zeros of a contiguous ``f``, ascending: ``f.view(-1).nonzero()[:, 0]``. On CPU
    the same set, found faster: NumPy's ``!= 0`` mask is read 8 bytes at a time as int64 words and only the words
    holding a non-zero byte are expanded (one torch CPU thread scans ~2x slower element by element)."""
    if f.device.type != "cpu" or f.numel() % 8:
        return f.view(-1).nonzero()[:, 0]
    mask = torch.from_numpy(f.detach().numpy() != 0).view(-1)
    words = mask.view(torch.int64).nonzero()[:, 0]
    cand = (words[:, None] * 8 + torch.arange(8)).view(-1)
    return cand.index_select(0, mask.index_select(0, cand).nonzero()[:, 0])


def _sorted(buf: LatentWindows) -> LatentWindows:
    """The buffer with each latent's slots sorted by score, best first (empty slots last)."""
    order = torch.argsort(buf.score, dim=1, descending=True, stable=True)
    w = order[..., None].expand(-1, -1, buf.window.shape[2])
    return LatentWindows(buf.score.gather(1, order), buf.value.gather(1, order), buf.row.gather(1, order),
                         buf.window.gather(1, w), buf.window_row.gather(1, w))


def quantile_groups(values: np.ndarray, rows: np.ndarray, n_groups: int = 5) -> list[np.ndarray]:
    """Split one latent's samples into ``n_groups`` bands of activation: sort the filled slots (``rows >= 0``) by
    value (ascending, ties by row) and cut them into ``n_groups`` consecutive groups of sizes as equal as possible
    (``np.array_split``). Returns, lowest band first, arrays of slot indices; empty groups are dropped."""
    filled = np.nonzero(rows >= 0)[0]
    order = filled[np.lexsort((rows[filled], values[filled]))]
    return [g for g in np.array_split(order, n_groups) if len(g)]
