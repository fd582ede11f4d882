#!/usr/bin/env python3
"""Markdown tables (value [95% interval]) from an eval's results.csv, as the README's results section shows them.

    python3 scripts/results_tables.py docs/eval-default/results.csv [--metric answer_logppl --task mean]

Without --metric: answer log-ppl (mean over tasks), then accuracy per task and the mean. Standard library only.
"""
import argparse
import csv
from collections import OrderedDict


def load(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt(row, prec):
    v = float(row["value"])
    if row["ci_low"] == "" or row["ci_high"] == "":
        return f"{v:.{prec}f}"
    return f"{v:.{prec}f} [{float(row['ci_low']):.{prec}f}, {float(row['ci_high']):.{prec}f}]"


def table(rows, metric, task, prec):
    cells = [r for r in rows if r["metric"] == metric and r["task"] == task]
    methods = list(OrderedDict.fromkeys(r["method"] for r in cells if r["method"] != "full"))
    ratios = sorted({r["ratio"] for r in cells if r["method"] != "full"}, key=float)
    out = ["| method | " + " | ".join(f"{x}×" for x in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for m in methods:
        by = {r["ratio"]: r for r in cells if r["method"] == m}
        out.append(f"| {m} | " + " | ".join(fmt(by[x], prec) if x in by else "–" for x in ratios) + " |")
    full = [r for r in cells if r["method"] == "full"]
    if full:
        out.append("")
        out.append(f"Full cache: {fmt(full[0], prec)}.")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--metric")
    ap.add_argument("--task", default="mean")
    a = ap.parse_args()
    rows = load(a.csv)
    if a.metric:
        print(table(rows, a.metric, a.task, 3 if a.metric != "accuracy" else 2))
        return
    print("Answer log-ppl (nats/token, mean over tasks; lower is better):\n")
    print(table(rows, "answer_logppl", "mean", 3))
    tasks = list(OrderedDict.fromkeys(r["task"] for r in rows if r["metric"] == "accuracy" and r["task"] != "mean"))
    for t in tasks + ["mean"]:
        name = "mean over tasks" if t == "mean" else t
        print(f"\nAccuracy, {name} (greedy generation, string match):\n")
        print(table(rows, "accuracy", t, 2))


if __name__ == "__main__":
    main()
