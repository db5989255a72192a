"""The black-box minimal-change frontier: median L2 against mean target queries.

    python benchmarks/frontier.py SURROGATE.th [--model SPEC --data DIR] [--split test|train] [--limit N]
        [--budgets 2,5,10,20] [--confidence C] [--rivals R] [--hsj 1x10,2x20] [--merge EARLIER.csv]
        [--guide-weight W] [--csv OUT.csv] [--plot OUT.png]
                                                   (the default target and data need ../shared)

The public CIFAR-10 ResNet-20 is the target, used only through its answers (in process, scores
or top-1 labels: the surrogate file says which it learned from). On its first N errors of the
chosen split, side by side in one run and on the same images:
- flipback `minimal` in black-box mode at each per-image budget (transfer, then shrink: see
  attacks/shrink.py);
- a plain binary search: the same transfer correction, then every query left on bisection
  along it toward the original (`minimal` with the steps along the boundary and pruning off);
- ART's HopSkipJump, targeted at the true class and started from flipback's own transfer
  success (`fast`, one query for most images), so both share the start. `--hsj ITERxEVALS`
  sets its iterations and first gradient-estimate size; its queries are counted per image.
Every change is rounded to 8 bits and verified again by the target before it counts.

`--split train` explains the target's training-set errors that the surrogate did not query:
the validation data on which flipback's settings were chosen (never on the test split).

`--guide-weight W` is a diagnosis, not a black-box run: the guide's logits are W times the
target's own (scaled to the surrogate's gradient size) plus 1 - W times the surrogate's, so
that W = 1 shows what `minimal` would reach with a perfect surrogate at the same query
budgets, and the median cosine between the guide's margin gradient and the target's
(printed, and in the rows' names) ties the changes' size to the guide's quality.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import time

import numpy as np
import torch

from flipback.attacks import FastAttack, MinimalAttack
from flipback.attacks.minimal import RIVALS
from flipback.data import load_dataset
from flipback.runs.explain_run import concat_results
from flipback.runs.errors import to_tensor
from flipback.targets import ModelGuide, load_model
from flipback.targets.blackbox import load_blackbox
from flipback.targets.surrogate import load_surrogate, self_train_images

SPEC = "cifar_resnet20:../shared/models/cifar10_resnet20.th"
DATA = "../shared/data/cifar10-jpeg"


def errors(split: str, limit: int, surrogates, spec: str = SPEC, data: str = DATA):
    """The target's first `limit` errors of `split`; on the train split, none that any of
    `surrogates` was fitted on (several: compare them on the same validation errors)."""
    ds = load_dataset(data, split=split, progress=False)
    net = load_model(spec, ds.num_classes).module.eval()
    skip = np.zeros(len(ds), dtype=bool)
    if split == "train":  # the images the surrogate was trained on are not validation data
        for s in surrogates:
            skip[fitted_images(s, len(ds))] = True
    picked = []
    with torch.no_grad():
        for s in range(0, len(ds), 1000):
            x = to_tensor(ds.images[s:s + 1000])
            wrong = (net(x).argmax(1).numpy() != ds.labels[s:s + 1000]) & ~skip[s:s + 1000]
            picked.extend((s + np.nonzero(wrong)[0]).tolist())
            if len(picked) >= limit:
                break
    idx = np.array(picked[:limit])
    return to_tensor(ds.images[idx]), torch.from_numpy(ds.labels[idx]).long(), ds.num_classes


def fitted_images(surrogate, n_images: int) -> np.ndarray:
    """The train images `surrogate` was fitted on: asked about, or labelled by itself."""
    if surrogate.trained_on is not None:  # saved with the file since it was kept
        return surrogate.trained_on
    # Files from before: train_surrogate's random draw, rebuilt (no --active choices in them).
    meta = surrogate.meta
    if meta.get("active"):
        raise SystemExit("this surrogate file is older than its record of the images it was trained on, "
                         "and --active chose some of them: retrain it for --split train")
    seed = meta.get("seed", 0)
    asked = np.random.default_rng(seed).permutation(n_images)[:meta["queries"]]
    labelled = self_train_images(n_images, asked, meta["self_train"], seed) if meta.get("self_train") else []
    return np.union1d(asked, labelled).astype(np.int64)


def surrogate_and_errors(path: str, split: str, limit: int, spec: str = SPEC, data: str = DATA, also=()):
    """The surrogate file's guide and the target's first `limit` errors of `split` ->
    (target answers: "scores" or "label", guide, images, labels, class count). On the train
    split the errors skip the images of the surrogate files `also` too."""
    surrogate = load_surrogate(path)
    x, y, k = errors(split, limit, [surrogate, *map(load_surrogate, also)], spec, data)
    return surrogate.meta["output"], ModelGuide(surrogate.module, k), x, y, k


class Blend(torch.nn.Module):
    """Logits w * scale * target + (1 - w) * surrogate: guides between the surrogate (w = 0)
    and a perfect one (w = 1, the target's own gradients, times `scale`), to measure how far
    black-box `minimal`'s changes depend on the guide's quality rather than on the queries."""

    def __init__(self, target: torch.nn.Module, surrogate: torch.nn.Module, w: float, scale: float = 1.0):
        super().__init__()
        self.target, self.surrogate, self.w, self.scale = target, surrogate, w, scale

    def forward(self, x):
        if self.w >= 1:
            return self.scale * self.target(x)
        return self.w * self.scale * self.target(x) + (1 - self.w) * self.surrogate(x)


def margin_gradients(net: torch.nn.Module, target: torch.nn.Module, x, y, batch=256) -> torch.Tensor:
    """Per image (flattened): the input gradient of `net`'s logit of the true class minus its
    logit of the target's (wrong) answer, at the original image."""
    out = []
    for s in range(0, len(x), batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        with torch.no_grad():
            wrong = target(xb).argmax(1)
        xg = xb.clone().requires_grad_(True)
        z = net(xg)
        margin = z.gather(1, yb[:, None]) - z.gather(1, wrong[:, None])
        out.append(torch.autograd.grad(margin.sum(), xg)[0].flatten(1))
    return torch.cat(out)


def diagnostic_guide(surrogate: torch.nn.Module, target: torch.nn.Module, x, y, w: float):
    """The guide of `--guide-weight w` (a diagnosis, never a black-box run) -> (its module, per
    image the cosine between its margin gradient and the target's: how well it points the way
    a correction must go). w = 0: the surrogate itself; w > 0: a `Blend`, the target's logits
    scaled to the surrogate's gradient size, so that w moves the guide's direction rather
    than its size (the surrogate averages its members' logits: its gradients are smaller)."""
    aim = margin_gradients(target, target, x, y)
    own = margin_gradients(surrogate, target, x, y)
    if w <= 0:
        return surrogate, torch.nn.functional.cosine_similarity(aim, own, dim=1)
    guide = Blend(target, surrogate, w, float(own.norm(dim=1).median() / aim.norm(dim=1).median()))
    return guide, torch.nn.functional.cosine_similarity(aim, margin_gradients(guide, target, x, y), dim=1)


def errors_id(x: torch.Tensor) -> str:
    """A fingerprint of the explained images (their 8-bit pixels, in order): `--merge` takes an
    earlier run's rows only when they came from exactly these images."""
    pixels = torch.round(x * 255).to(torch.uint8).contiguous().numpy()
    return hashlib.sha256(pixels.tobytes()).hexdigest()[:16]


def row(family, setting, x, corrected, success, queries, seconds):
    l2 = (corrected - x).flatten(1).norm(dim=1)
    ok = success.bool()
    return {"method": family, "setting": setting, "images": len(x), "errors_id": errors_id(x),
            "success": float(ok.float().mean()),
            "mean_queries": float(queries.float().mean()),
            "median_l2": float(l2[ok].median()) if ok.any() else float("nan"),
            "seconds_per_image": seconds / len(x)}


def merged_rows(path: str, x: torch.Tensor) -> list[dict]:
    """An earlier run's `--csv` rows, refused unless they came from the same images `x`.
    Files from before the fingerprint column are checked by their image count only."""
    rows, here = [], errors_id(x)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fingerprinted = "errors_id" in (reader.fieldnames or [])
        for r in reader:
            if int(r["images"]) != len(x):
                raise SystemExit(f"{path}: a run on {r['images']} errors, not these {len(x)}")
            if r.get("errors_id", here) != here:
                raise SystemExit(f"{path}: a run on {r['images']} other errors than these (fingerprint "
                                 f"{r['errors_id']}, here {here})")
            rows.append({**r, "images": int(r["images"]), "errors_id": here,
                         **{key: float(r[key]) for key in ("success", "mean_queries", "median_l2", "seconds_per_image")}})
    if not fingerprinted:
        print(f"{path}: an older file without the images' fingerprint; only their count ({len(x)}) was checked")
    return rows


def run_batched(attack, target, guide, x, y, batch=256):
    """`attack.run` on every image, `batch` at a time -> (one AttackResult, seconds). Checks
    that the records' queries add up to what the target counted."""
    t0 = time.perf_counter()
    before = target.queries
    r = concat_results([attack.run(target, guide, x[s:s + batch], y[s:s + batch],
                                   torch.arange(s, min(s + batch, len(x)))) for s in range(0, len(x), batch)])
    assert int(r.queries.sum()) == target.queries - before  # the accountant agrees
    return r, time.perf_counter() - t0


def run_flipback(attack, target, guide, x, y, batch=256):
    r, seconds = run_batched(attack, target, guide, x, y, batch)
    return r.corrected, r.success, r.queries, seconds


class Start:
    """`fast`'s transfer corrections, computed once and shared by every budget (what `minimal`
    does first in black-box mode). An image that needed more queries than a budget gets the
    transfer run again with that budget, so each budget's start is exactly what `minimal`
    itself would have reached."""

    def __init__(self, target, guide, x, y, confidence: float = 4.0):
        self.target, self.guide, self.x, self.y, self.confidence = target, guide, x, y, confidence
        self.result = run_flipback(FastAttack(confidence=confidence), target, guide, x, y)
        self.seconds = self.result[3]

    def at(self, budget: int):
        corrected, success, queries = (t.clone() for t in self.result[:3])
        over = (queries > budget).nonzero().squeeze(1)
        if len(over):
            c, s, q, _ = run_flipback(FastAttack(max_queries=budget, confidence=self.confidence), self.target, self.guide, self.x[over],
                                      self.y[over])
            corrected[over], success[over], queries[over] = c, s, q
        return corrected, success, queries


def run_refine(attack, start: Start, budget: int, batch=256):
    """`attack.refine` on every image from the shared start, within `budget` queries in all."""
    target, guide, x, y = start.target, start.guide, start.x, start.y
    corrected, success, queries = start.at(budget)
    t0 = time.perf_counter()
    before = target.queries
    out_c, out_s, out_q = [], [], []
    for s in range(0, len(x), batch):
        sl = slice(s, s + batch)
        call = attack.start(target, guide, x[sl], y[sl], torch.arange(s, min(s + batch, len(x))),
                            torch.full((len(x[sl]),), budget))
        call.corrected = corrected[sl].clone()
        call.success = success[sl].clone()
        call.queries = queries[sl].clone()
        answer = target.query(call.corrected, counted=False)  # the start's answers, as the call had them
        call.answered = answer.labels.clone()
        if answer.scores is not None:
            call.scores = answer.scores.float().clone()
        attack.refine(call)
        out_c.append(call.corrected)
        out_s.append(call.success)
        out_q.append(call.queries)
    spent = torch.cat(out_q) - queries
    assert int(spent.sum()) == target.queries - before and (torch.cat(out_q) <= budget).all()
    return torch.cat(out_c), torch.cat(out_s), torch.cat(out_q), time.perf_counter() - t0 + start.seconds


def run_hsj(target, x, y, start, start_queries, start_ok, k, iters, evals):
    """ART's HopSkipJump from flipback's transfer success, one image at a time (ART loops over
    images anyway), its queries counted per image by a counting predict function."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    counter = {"n": 0}

    def predict(batch):
        counter["n"] += len(batch)
        t = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()
        answer = target.query(t, counted=False)
        if answer.scores is not None:
            return answer.scores.float().numpy()
        return torch.nn.functional.one_hot(answer.labels, k).float().numpy()

    clf = BlackBoxClassifier(predict, input_shape=tuple(x.shape[2:]) + (x.shape[1],), nb_classes=k,
                             clip_values=(0.0, 1.0))
    hsj = HopSkipJump(clf, targeted=True, norm=2, max_iter=iters, max_eval=10 * evals, init_eval=evals,
                      init_size=1, verbose=False)
    t0 = time.perf_counter()
    out = start.clone()
    queries = start_queries.clone()
    for i in range(len(x)):
        if not start_ok[i]:
            continue
        counter["n"] = 0
        xi = x[i:i + 1].permute(0, 2, 3, 1).numpy()
        init = start[i:i + 1].permute(0, 2, 3, 1).numpy()
        adv = hsj.generate(xi, y=np.array([int(y[i])]), x_adv_init=init)
        cand = torch.round(torch.from_numpy(adv).permute(0, 3, 1, 2).clamp(0, 1) * 255) / 255
        counter["n"] += 1  # the 8-bit candidate is verified by one more query
        if int(target.query(cand, counted=False).labels[0]) == int(y[i]):
            out[i] = cand[0]
        queries[i] += counter["n"]
    ok = (target.query(out, counted=False).labels == y) & start_ok
    return out, ok, queries, time.perf_counter() - t0


def plot(rows, path, title):
    """Two panels against mean queries (log scale): median L2, and success; one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    families: dict[str, list] = {}
    for r in rows:
        families.setdefault(r["method"], []).append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rs in families.items():
        rs = sorted(rs, key=lambda r: r["mean_queries"])
        q = [r["mean_queries"] for r in rs]
        a.plot(q, [r["median_l2"] for r in rs], "o-", label=name)
        b.plot(q, [100 * r["success"] for r in rs], "o-", label=name)
    for ax, ylabel in ((a, "median L2 of the 8-bit change"), (b, "success (%)")):
        ax.set_xscale("log")
        ax.set_xticks([2, 5, 10, 20, 50, 100])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("mean target queries per image")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("surrogate")
    ap.add_argument("--model", default=SPEC, help="the target (default: the public CIFAR-10 ResNet-20)")
    ap.add_argument("--data", default=DATA, help="its data set (the surrogate must have been trained on its train split)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--confidence", type=float, default=4.0,
                    help="the transfer step's wanted surrogate margin (minimal's and fast's default: 4)")
    ap.add_argument("--limit", type=int, default=10**9)
    ap.add_argument("--budgets", default="2,5,10,20,50,100")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also the plain binary search at each budget")
    ap.add_argument("--rivals", type=int, default=RIVALS,
                    help=f"labels only: the rival classes whose surrogate normals the rotations take in turn (default {RIVALS})")
    ap.add_argument("--hsj", default="", help="HopSkipJump settings ITERxEVALS, comma-separated (needs ART)")
    ap.add_argument("--also-skip", action="append", default=[], metavar="SURROGATE",
                    help="with --split train: also skip the images this surrogate file was fitted on, so that "
                         "runs with either surrogate explain the same validation errors (repeatable)")
    ap.add_argument("--merge", action="append", default=[], metavar="CSV",
                    help="add the rows of an earlier run's --csv on the same errors to this run's table, plot "
                         "and --csv (repeatable)")
    ap.add_argument("--guide-weight", type=float, default=None, metavar="W",
                    help="diagnosis only (the target's gradients are not a black-box user's): steer by W x the "
                         "target's logits (scaled to the surrogate's gradient size) + (1 - W) x the surrogate's; "
                         "1 is a perfect surrogate, 0 the surrogate itself. Prints the median cosine between the "
                         "guide's margin gradient and the target's")
    ap.add_argument("--csv")
    ap.add_argument("--plot", help="write the frontier (success and median L2 against mean queries) to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(2)
    output, guide, x, y, k = surrogate_and_errors(args.surrogate, args.split, args.limit, args.model, args.data,
                                                  args.also_skip)
    rows, tag = [], ""
    # With labels only the rotations' rival count is part of the method (earlier runs: one rival).
    name = "flipback minimal" if output == "scores" else f"flipback minimal ({args.rivals} rival{'s' * (args.rivals > 1)})"
    if args.guide_weight is not None:
        module, cos = diagnostic_guide(guide.module, load_model(args.model, k).module.eval(), x, y, args.guide_weight)
        guide = ModelGuide(module, k)
        # Every row starts from the guided transfer: each name says so.
        tag = f", guide {args.guide_weight:g} target (median cosine {float(cos.median()):.3f})"
        print(f"guide: {args.guide_weight:g} x the target's logits (scaled to the surrogate's gradient size); "
              f"margin-gradient cosine with the target's: median {float(cos.median()):.3f}, "
              f"quartiles {float(cos.quantile(0.25)):.3f} to {float(cos.quantile(0.75)):.3f}")
    with load_blackbox(args.model, k, output=output) as target:
        start = Start(target, guide, x, y, args.confidence)
        for b in [int(v) for v in args.budgets.split(",") if v]:
            attack = MinimalAttack(max_queries=b, confidence=args.confidence, rivals=args.rivals)
            rows.append(row(name + tag, f"budget {b}", x, *run_refine(attack, start, b)))
            print(rows[-1], flush=True)
            if args.baseline:
                line = MinimalAttack(max_queries=b, rotate=0, probes=0, prune_steps=0, line_steps=b)
                rows.append(row("binary search" + tag, f"budget {b}", x, *run_refine(line, start, b)))
                print(rows[-1], flush=True)
        for setting in [v for v in args.hsj.split(",") if v]:
            iters, evals = (int(v) for v in setting.split("x"))
            corrected, ok, q = start.result[:3]
            rows.append(row("ART HopSkipJump" + tag, f"{iters} iterations, {evals} first evaluations", x,
                            *run_hsj(target, x, y, corrected, q, ok, k, iters, evals)))
            print(rows[-1], flush=True)
    for path in args.merge:
        rows.extend(merged_rows(path, x))
    print(f"\n{len(x)} {args.split} errors, target answers: {output}\n")
    print("| method | setting | success | mean queries | median L2 | s/image |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['setting']} | {100 * r['success']:.2f}% | {r['mean_queries']:.2f} | {r['median_l2']:.4f} "
              f"| {r['seconds_per_image']:.3f} |")
    if args.plot:
        plot(rows, args.plot, f"{len(x)} {args.model.split(':')[0]} {args.split} errors, target answers: {output}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
