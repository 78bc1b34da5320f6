"""`python -m soak [--duration S]`: runs the chaos soak, prints its table and writes its JSON.
Exit status 1 when any invariant was violated."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soak.driver import SoakConfig, run_soak

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults (default 600)")
    parser.add_argument("--clients", type=int, default=6, help="clients starting swarms at once")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run's random choices")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "soak-results.json", help="where to write the report"
    )
    args = parser.parse_args()
    report = run_soak(
        SoakConfig(duration_s=args.duration, clients=args.clients, seed=args.seed),
        log=lambda line: print(line, file=sys.stderr, flush=True),
        json_path=args.json,
    )
    print(report.table())
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
