"""Black-box `regions` with and without its free-change fallback, on the same errors.

    python benchmarks/regions_blackbox.py SURROGATE.th [--split test|train] [--limit N] [--no-baseline]
                                                                                          (needs ../shared)

The public CIFAR-10 ResNet-20 is the target, used only through its answers (in process, scores
or top-1 labels: the surrogate file says which it learned from). On its first N errors of the
split, side by side in one run: `regions` as a removal only (`fallback=None`: what black-box
`regions` was before the fallback) and with the default fallback, where the images that no
removal corrected get a free change (within +-eps) in the regions, with the budget they have
left. Every correction is an 8-bit image the target verified. `--split train` explains the
target's training-set errors that the surrogate did not query: the validation data.
"""

from __future__ import annotations

import argparse

import torch

from flipback.attacks import RegionsAttack
from flipback.targets.blackbox import load_blackbox

from frontier import SPEC, run_batched, surrogate_and_errors


def run(attack, target, guide, x, y):
    r, seconds = run_batched(attack, target, guide, x, y)
    ok, q, corrected, regions = r.success, r.queries, r.corrected, r.regions
    # The target's own answer on every kept image: a success is a verified 8-bit correction.
    assert torch.equal(corrected, torch.round(corrected * 255) / 255)
    assert bool((target.query(corrected[ok], counted=False).labels == y[ok]).all())
    l2 = (corrected - x).flatten(1).norm(dim=1)[ok]
    n_regions = regions.flatten(1).amax(1)[ok].float()
    share = (regions > 0).flatten(1).float().mean(1)[ok]
    med = lambda t: float(t.median()) if len(t) else float("nan")  # noqa: E731
    return {"success": float(ok.float().mean()), "queries": float(q.float().mean()),
            "queries_ok": float(q[ok].float().mean()) if ok.any() else float("nan"),
            "l2": med(l2), "regions": med(n_regions), "share": med(share),
            "free": sum(c == "free" for c in r.change), "n": len(x), "s_per_image": seconds / len(x)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("surrogate")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=10**9)
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also the removal-only row")
    args = ap.parse_args()
    torch.set_num_threads(2)
    output, guide, x, y, k = surrogate_and_errors(args.surrogate, args.split, args.limit)
    rows = []
    with load_blackbox(SPEC, k, output=output) as target:
        for name, attack in ((("removal only (no fallback)", RegionsAttack(fallback=None)),) * args.baseline +
                             (("removal, else a free change (the default)", RegionsAttack()),)):
            rows.append((name, run(attack, target, guide, x, y)))
            print(name, rows[-1], flush=True)
    print(f"\n{len(x)} {args.split} errors, target answers: {output}\n")
    print("| `regions` | success | mean queries (all) | mean queries (successes) | median L2 | median regions "
          "| median share of the image | corrected by a free change | s/image |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {100 * r['success']:.2f}% | {r['queries']:.2f} | {r['queries_ok']:.2f} | {r['l2']:.3f} "
              f"| {r['regions']:.0f} | {100 * r['share']:.1f}% | {r['free']} of {r['n']} | {r['s_per_image']:.3f} |")


if __name__ == "__main__":
    main()
