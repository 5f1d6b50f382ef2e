"""Thin wrapper: `spinquant.report.tables` (see its docstring; `python scripts/make_tables.py --help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.report.tables import main  # noqa: E402

if __name__ == "__main__":
    main()
