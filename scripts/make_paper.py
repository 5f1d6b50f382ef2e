"""Thin wrapper: `spinquant paper` on this checkout (`make paper`); see spinquant/report/paper.py."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spinquant.report.paper import main  # noqa: E402

if __name__ == "__main__":
    main(["--root", str(ROOT), *sys.argv[1:]])
