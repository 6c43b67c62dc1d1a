"""Seed spread of the CamVid new-class experiment: mean and sample standard deviation per row over runs.

Each argument is an ``--out`` folder of ``bench/camvid_newclass.py`` (its ``results.json``), typically the same
settings with different ``--seed`` (and a fixed ``--labeler-seed``, so the pseudo labels stay the same). Rows
are matched by id; a row scored in fewer runs than the others says so (``n``). Prints a markdown table and
JSON. A difference between two rows smaller than about two standard deviations is not a finding.

Example::

    .venv/bin/python bench/camvid_seeds.py runs/camvid_newclass runs/camvid_newclass_s1 \\
        runs/camvid_newclass_s2 --split val
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = (("car", "iou"), ("car", "biou"), ("car", "bf1"), (None, "miou7"))


def _value(scores: dict[str, Any], group: str | None, key: str) -> float | None:
    holder = scores.get(group) if group else scores
    value = (holder or {}).get(key)
    return float(value) if value is not None and math.isfinite(float(value)) else None


def seed_spread(results: Sequence[dict[str, Any]], *, split: str) -> list[dict[str, Any]]:
    """Per row (first-seen order): for each metric the values of every run, their mean and sd (None if < 2)."""
    rows: dict[str, dict[str, Any]] = {}
    for res in results:
        seed = res["settings"].get("seed")
        for row in res["rows"]:
            scores = row["scores"].get(split)
            if scores is None:
                continue
            entry = rows.setdefault(row["id"], {"id": row["id"], "name": row["name"], "seeds": [], "values": {}})
            entry["seeds"].append(seed)
            for group, key in METRICS:
                entry["values"].setdefault(key, []).append(_value(scores, group, key))
    out = []
    for entry in rows.values():
        stats = {}
        for key, values in entry["values"].items():
            present = [v for v in values if v is not None]
            stats[key] = {
                "values": values,
                "mean": statistics.fmean(present) if present else None,
                "sd": statistics.stdev(present) if len(present) > 1 else None,
            }
        out.append({"id": entry["id"], "name": entry["name"], "seeds": entry["seeds"], "n": len(entry["seeds"]),
                    "stats": stats})
    return out


def _cell(stat: dict[str, Any], *, scale: float, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['sd'] * scale:.{digits}f}" if stat["sd"] is not None else "")


def markdown(spread: Sequence[dict[str, Any]], *, split: str) -> str:
    lines = [f"| Row | n | car IoU {split} | car BIoU {split} | car BF1 {split} | 7-cls mIoU {split} |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in spread:
        s = r["stats"]
        lines.append(f"| {r['name']} | {r['n']} | {_cell(s['iou'], scale=100, digits=2)} | "
                     f"{_cell(s['biou'], scale=100, digits=2)} | {_cell(s['bf1'], scale=1, digits=4)} | "
                     f"{_cell(s['miou7'], scale=100, digits=2)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="--out folders of bench/camvid_newclass.py")
    ap.add_argument("--split", default="val", help="split to summarise (investigations: val)")
    args = ap.parse_args(argv)
    results = []
    for folder in args.runs:
        path = Path(folder) / "results.json"
        if not path.is_file():
            sys.exit(f"camvid_seeds: {path} not found (not a finished camvid_newclass run)")
        results.append(json.loads(path.read_text()))
    spread = seed_spread(results, split=args.split)
    print(markdown(spread, split=args.split))
    print(json.dumps({"split": args.split, "runs": args.runs, "rows": spread}, indent=2))


if __name__ == "__main__":
    main()
