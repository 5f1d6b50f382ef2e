"""Thin wrapper: `spinquant.report.bench` (see its docstring; `python scripts/bench_table.py --help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.report.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
