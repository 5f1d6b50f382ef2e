"""Thin wrapper: `spinquant.report.plots` (see its docstring; `python scripts/plot_pareto.py --help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.report.plots import main  # noqa: E402

if __name__ == "__main__":
    main()
