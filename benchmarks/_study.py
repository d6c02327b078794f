"""The command line shared by the method-study scripts (hstu_cd_study.py, gca_study.py):
train the selected variants of a grid for some seeds, then print the report."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def study_main(doc: str, grid: dict, run_grid: Callable[[str, list[int], Path, list[str], list[str]], None],
               report: Callable[[str, Path], str], out: str, dataset: str = "amazon-food-kitchen-benchmark") -> int:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=dataset)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--variants", nargs="+", default=list(grid), choices=list(grid))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override, e.g. train.lr=0.001")
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        run_grid(args.dataset, args.seeds, args.out, args.sets, args.variants)
    print(report(args.dataset, args.out))
    return 0
