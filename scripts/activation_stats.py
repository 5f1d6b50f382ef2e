"""Thin wrapper: `spinquant.report.activation_stats` (see its docstring; `python scripts/activation_stats.py --help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.report.activation_stats import main  # noqa: E402

if __name__ == "__main__":
    main()
