"""Recompute the golden rows (tests/golden_cases.py): `python scripts/golden_rows.py --write` from a clean checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.golden_cases import main  # noqa: E402

if __name__ == "__main__":
    main()
