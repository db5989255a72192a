"""Per-kind Markdown tables (issue 14) from `flipback bench faithfulness --kind KIND` run folders.

Usage: python benchmarks/faithfulness_kinds_table.py RUN_DIR...   Every figure is read from
the runs' summary.json; nothing is typed in. Methods are ranked on the metrics flipback did
not write (`rank_metrics`); deletion-to-correct (flipback's own) is one more column.
"""

import json
import sys
from pathlib import Path

import numpy as np

COLUMNS = [("quantus_pointing_game", "pointing", "{:.1%}"), ("quantus_relevance_rank_accuracy", "rank acc.", "{:.3f}"),
           ("quantus_relevance_mass_accuracy", "mass acc.", "{:.3f}"), ("pattern_correlation", "corr.", "{:.3f}"),
           ("both_found", "both found", "{:.1%}"), ("road_auc", "ROAD AUC", "{:.3f}"),
           ("deletion_auc", "deletion AUC (flipback's)", "{:.3f}"), ("evaluations_per_image", "evals/image", "{:.0f}"),
           ("seconds_per_image", "s/image", "{:.3f}")]


def rows(s: dict) -> dict:
    return {name: m.get("best", m) for name, m in s["methods"].items()}


def table(run: Path) -> tuple[str, dict]:
    s = json.loads((run / "summary.json").read_text())
    r = rows(s)
    cols = [c for c in COLUMNS if c[0] in r["flipback-regions"]]
    head = ["method"] + [c[1] for c in cols] + ["mean rank"]
    cue = s["cue"]
    lines = [f"**{run.name}**: cue `{cue['kind']}` (size {cue['size']}), {s['n_images']} of "
             f"{s['n_planted_errors']} planted errors; cued model clean accuracy {s['clean_accuracy']:.1%} "
             f"(uncued {s['uncued_accuracy']:.1%}), cue success {s['cue_success']:.1%}"
             + (f", one patch alone: {s['part_success']['a']:.1%} / {s['part_success']['b']:.1%}"
                if "part_success" in s else "") + f"; ranked on {', '.join(s['rank_metrics'])}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(r, key=lambda n: s["mean_rank"][n]):
        m = r[name]
        cells = [name] + [fmt.format(m[k]) if m.get(k) is not None and np.isfinite(m[k]) else "-"
                          for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells + [f"{s['mean_rank'][name]:.2f}"]) + " |")
    # Where the best baseline is below 95%, is flipback at least as high? Its regions method,
    # and the better of its two methods (regions, minimal), each said.
    notes, bar = [], []
    for k in s["rank_metrics"]:
        base = {n: m[k] for n, m in r.items() if not n.startswith("flipback") and k in m}
        top = max(base, key=base.get)
        ours = r["flipback-regions"][k]
        mine = r["flipback-minimal"].get(k, float("-inf"))
        if base[top] < 0.95:
            notes.append(f"{k}: regions {ours:.3f}, minimal {mine:.3f} vs best baseline {top} {base[top]:.3f} "
                         f"(regions: {'at least as high' if ours >= base[top] else 'LOSS'}; "
                         f"flipback's better: {'at least as high' if max(ours, mine) >= base[top] else 'LOSS'})")
            bar.append((ours >= base[top], max(ours, mine) >= base[top]))
        else:
            notes.append(f"{k}: best baseline {top} {base[top]:.3f} >= 0.95 (no room to separate)")
    lines += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines), s["mean_rank"], bar


def main(runs):
    """Each run folder's table; then, per data set (the run folder's name up to its first
    '-': fmnist-checker, cifar-or) and over all, the mean rank and the 95% bar's tally."""
    ranks: dict[str, dict[str, list[float]]] = {}
    bars: dict[str, list] = {}
    for run in map(Path, runs):
        text, mr, bar = table(run)
        print(text)
        group = run.name.split("-", 1)[0]
        for name, v in mr.items():
            ranks.setdefault(group, {}).setdefault(name, []).append(v)
        bars.setdefault(group, []).extend(bar)
    if len(ranks) > 1:  # with one data set, "all" would repeat it
        ranks["all"] = {name: [v for g in ranks.values() for v in g.get(name, [])]
                        for name in {n for g in ranks.values() for n in g}}
        bars["all"] = [b for g in bars.values() for b in g]
    for g, table_ in ranks.items():
        print(f"**Mean rank, {g}** (1 = best):\n")
        print("| method | mean rank | kinds |\n|---|---|---|")
        for name, v in sorted(table_.items(), key=lambda kv: np.mean(kv[1])):
            print(f"| {name} | {np.mean(v):.2f} | {len(v)} |")
        b = bars[g]
        print(f"\nBar ({g}): of {len(b)} kind x metric cells where the best baseline is below 0.95, "
              f"regions is at least as high in {sum(x for x, _ in b)}, flipback's better method in "
              f"{sum(y for _, y in b)}.\n")


if __name__ == "__main__":
    main(sys.argv[1:])
