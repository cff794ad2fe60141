"""Measured figures, printed by the tests and collected by scripts/bench.

Each figure is printed on one line (label: local test bed) and, when KCP_FIGURES names
a file, appended to it as JSON so the benchmark can report every figure with the
baseline measured in the same run.
"""

from __future__ import annotations

import json
import os
import time


def record(name: str, seconds: float, baseline: str, baseline_seconds: float,
           bound: str | None = None) -> None:
    figure = {"figure": name, "seconds": round(seconds, 3), "baseline": baseline,
              "baseline_seconds": round(baseline_seconds, 3), "bound": bound,
              "where": "local test bed", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"\nFIGURE (local test bed) {name}: {seconds:.2f} s; baseline {baseline}: {baseline_seconds:.2f} s"
          + (f"; bound {bound}" if bound else ""))
    target = os.environ.get("KCP_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(figure) + "\n")
