"""Markdown tables (for docs/benchmarks.md) from `flipback bench faithfulness` run folders."""

import json
import sys
from pathlib import Path


def table(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    planted = s["kind"] == "planted"
    fr = [f"{float(f):.0%}" for f in s["fractions"]]
    head = ["method", "variant"] + (["pointing", "top-k precision"] if planted else []) + fr + ["AUC", "s/image"]
    lines = [f"**{run.name}**: {s['n_images']} {s['kind']} errors of `{s['model']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, variant, m):
        cells = [name, variant] + ([f"{m['pointing']:.1%}", f"{m['topk_precision']:.3f}"] if planted else [])
        cells += [f"{m['deletion'][str(f)]:.1%}" for f in s["fractions"]]
        cells += [f"{m['deletion_auc']:.3f}", f"{m['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")

    for name, m in s["methods"].items():
        if "variants" in m:
            for v, mv in m["variants"].items():
                row(name, v, mv)
        else:
            row(name, "", m)
    extra = {k: s[k] for k in ("clean_accuracy", "uncued_accuracy", "cue_success", "n_planted_errors",
                                "accuracy", "n_errors") if k in s}
    r = s["methods"]["flipback-regions"]
    extra.update({k: r[k] for k in ("success_rate", "mean_queries", "median_regions", "median_fraction")})
    lines += ["", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()),
              "", "verdict: " + json.dumps(s["verdict"])]
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(Path(p)) for p in sys.argv[1:]))
