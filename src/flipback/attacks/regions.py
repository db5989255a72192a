"""flipback's region-level corrective method: the fewest image regions inside which a
bounded change makes the model right.

The image is split into regions (SLIC superpixels or a grid, see `segments`). The search
grows a set of regions one at a time. The next region is the one where a change bounded
by `eps` (L-inf) buys the most margin to first order: the sum over its pixels of
|gradient| times the room left to move. Signed-gradient steps (of size eps/2) act only
inside the chosen regions; after `steps_per_region` steps without success, the next
region joins. So an error with one cause is fixed inside one region, and the regions that
were needed are the explanation.

Once corrected, the regions are pruned (the one that contributes least is taken back while
the image stays corrected), the change is shrunk by bisection on its scale, and the kept
regions are ranked by their first-order contribution to the margin, g . delta over the
region, at the corrected point.

White-box: every step is one counted gradient query, which also verifies the candidate.
"""

from __future__ import annotations

import torch

from ..targets.whitebox import WhiteBoxTarget, margin, smooth_margin
from .base import MIN_MARGIN, AttackResult, CorrectiveAttack, to_grid
from .segments import segment


def region_onehot(seg: torch.Tensor) -> torch.Tensor:
    """(N,H,W) region ids -> (N, H*W, S) one-hot float."""
    s = int(seg.max()) + 1 if seg.numel() else 1
    return torch.nn.functional.one_hot(seg.flatten(1), s).float()


def room(x: torch.Tensor, delta: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """How far each value may still move along sign(g), within the eps bound and [0, 1]."""
    up = torch.minimum(eps - delta, 1 - x - delta)
    down = torch.minimum(eps + delta, x + delta)
    return torch.where(g > 0, up, down).clamp_min(0)


def region_scores(pixel_values: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Per-pixel values (n, C, H, W) summed per region: (n, S)."""
    return torch.bmm(pixel_values.sum(1).flatten(1)[:, None, :], onehot).squeeze(1)


def pixel_mask(onehot: torch.Tensor, selected: torch.Tensor, shape) -> torch.Tensor:
    """(n, S) selected regions -> (n, 1, H, W) 0/1 mask."""
    m = torch.bmm(onehot, selected.float()[:, :, None]).squeeze(2)
    return (m > 0).float().view(shape[0], 1, shape[2], shape[3])


def rank_map(onehot: torch.Tensor, selected: torch.Tensor, contribution: torch.Tensor, shape) -> torch.Tensor:
    """(n,H,W) int: 1 for the selected region that contributes most, 2 for the next, ...,
    0 outside the selected regions."""
    score = torch.where(selected, contribution, torch.full_like(contribution, float("-inf")))
    order = score.argsort(1, descending=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(1, order.shape[1] + 1).expand_as(order))
    ranks = torch.where(selected, ranks, torch.zeros_like(ranks))
    per_pixel = torch.bmm(onehot, ranks.float()[:, :, None]).squeeze(2)
    return per_pixel.round().long().view(shape[0], shape[2], shape[3])


class RegionsAttack(CorrectiveAttack):
    name = "regions"

    def __init__(self, *, eps: float = 0.5, segmentation: str = "slic", n_segments: int | None = None,
                 compactness: float = 0.1, steps_per_region: int = 2, max_regions: int = 16, prune_steps: int = 2,
                 shrink_steps: int = 3, max_queries: int = 60, pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.eps = eps
        self.segmentation, self.n_segments, self.compactness = segmentation, n_segments, compactness
        self.steps_per_region, self.max_regions = steps_per_region, max_regions
        self.prune_steps, self.shrink_steps = prune_steps, shrink_steps
        self.max_queries = max_queries

    # The two hooks a black-box version replaces. White-box: one counted gradient query both
    # guides the next step and verifies the candidate.
    def _probe(self, target, x, labels, rows):
        """-> (verified correct, the target's answer, gradient to follow, rows that cost a query).
        `rows` are the images' positions in the batch."""
        out, g = target.gradient(x, labels, smooth_margin)
        return margin(out, labels) > MIN_MARGIN, out, g, torch.ones(len(x), dtype=torch.bool)

    def _check(self, target, x, labels, rows):
        """-> (verified correct, the target's answer); one counted query per image."""
        out = target.predict(x)
        return margin(out, labels) > MIN_MARGIN, out

    def _start_gradient(self, target, x, labels):
        return target.gradient(x, labels, smooth_margin, counted=False)[1]

    def _iterations(self) -> int:
        return self.max_queries - self.prune_steps - self.shrink_steps

    def run(self, target, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> AttackResult:
        self._ids = torch.arange(len(images)) if ids is None else ids
        corrected, success, queries, logits = self._start(target, images)
        self._queries = queries
        x0 = corrected.clone()
        shape = x0.shape
        onehot = region_onehot(segment(x0, self.segmentation, self.n_segments, self.compactness))
        n, s = len(x0), onehot.shape[2]
        selected = torch.zeros(n, s, dtype=torch.bool)
        since = torch.zeros(n, dtype=torch.long)  # steps since the last region joined
        delta = torch.zeros_like(x0)
        final_grad = torch.zeros_like(x0)
        g = self._start_gradient(target, x0, labels)
        start_grad = g.clone()
        active = torch.arange(n)
        for _ in range(self._iterations()):
            if len(active) == 0 or int(queries[active].min()) >= self.max_queries - self.prune_steps - self.shrink_steps:
                break
            a = active
            k = selected[a].sum(1)
            need = ((since[a] >= self.steps_per_region) | (k == 0)) & (k < min(self.max_regions, s))
            if bool(need.any()):
                gain = region_scores(g[need].abs() * room(x0[a[need]], delta[a[need]], g[need], self.eps),
                                     onehot[a[need]])
                gain = gain.masked_fill(selected[a[need]], float("-inf"))
                selected[a[need], gain.argmax(1)] = True
                since[a[need]] = 0
            step = 0.5 * self.eps * g.sign() * pixel_mask(onehot[a], selected[a], (len(a), *shape[1:]))
            x = to_grid(x0[a] + (delta[a] + step).clamp(-self.eps, self.eps), self.pixels)
            ok, out, g, asked = self._probe(target, x, labels[a], a)
            queries[a] += asked.long()
            since[a] += 1
            delta[a] = x - x0[a]
            corrected[a] = x
            logits[a[asked]] = out[asked]
            success[a[ok]] = True
            final_grad[a[ok]] = g[ok]
            active, g = a[~ok], g[~ok]

        done = success.nonzero().squeeze(1)
        if len(done):
            self._prune(target, labels, x0, delta, selected, final_grad, onehot, done, corrected, logits, queries)
            self._shrink(target, labels, x0, delta, done, corrected, logits, queries)
        # Each pixel's share of the margin gained: its change times the mean of the gradients at
        # both ends of the path (a two-point integrated gradient along x0 -> x0 + delta).
        pixel_gain = (delta * (start_grad + final_grad) / 2).sum(1, keepdim=True)
        regions = rank_map(onehot, selected, region_scores(pixel_gain, onehot), shape)
        return AttackResult(corrected, success, queries, logits, regions=regions,
                            importance=pixel_gain.squeeze(1) * (regions > 0))

    def _prune(self, target, labels, x0, delta, selected, grad, onehot, idx, corrected, logits,
               queries) -> None:
        """Take back the least-contributing region while the image stays corrected."""
        for _ in range(self.prune_steps):
            idx = idx[selected[idx].sum(1) >= 2]
            if len(idx) == 0:
                return
            contribution = region_scores(grad[idx] * delta[idx], onehot[idx])
            weakest = contribution.masked_fill(~selected[idx], float("inf")).argmin(1)
            without = selected[idx].clone()
            without[torch.arange(len(idx)), weakest] = False
            d = delta[idx] * pixel_mask(onehot[idx], without, delta[idx].shape)
            x = to_grid(x0[idx] + d, self.pixels)
            ok, out = self._check(target, x, labels[idx], idx)
            queries[idx] += 1
            kept = idx[ok]
            selected[kept] = without[ok]
            delta[kept], corrected[kept], logits[kept] = x[ok] - x0[kept], x[ok], out[ok]
            idx = kept

    def _shrink(self, target, labels, x0, delta, idx, corrected, logits, queries) -> None:
        """The smallest scale of the change (bisection in (0, 1]) that still corrects."""
        lo = torch.zeros(len(idx))
        hi = torch.ones(len(idx))
        base = delta[idx].clone()
        for _ in range(self.shrink_steps):
            scale = (lo + hi) / 2
            x = to_grid(x0[idx] + base * scale[:, None, None, None], self.pixels)
            ok, out = self._check(target, x, labels[idx], idx)
            queries[idx] += 1
            hi = torch.where(ok, scale, hi)
            lo = torch.where(ok, lo, scale)
            good = idx[ok]
            delta[good], corrected[good], logits[good] = x[ok] - x0[good], x[ok], out[ok]


def ranked_map(regions: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """One (N,H,W) map from a region method's result: every pixel of the top region above
    every pixel of the second, and so on; within a region, pixels by their share of the
    margin gained. Pixels outside the regions are 0."""
    k = regions.amax((1, 2), keepdim=True)
    gain = importance.clamp_min(0)
    within = gain / gain.amax((1, 2), keepdim=True).clamp_min(1e-12)
    return torch.where(regions > 0, (k + 1 - regions).float() + 0.99 * within, torch.zeros_like(gain))
