"""Golden rows: cheap runs recomputed on every test run and compared with the numbers committed in
tests/golden/rows.json (written by `scripts/golden_rows.py --write` from a clean commit). The tolerance is far
below what a real change of behaviour moves (a one-character change to the quantizer's rounding or to the
Cayley step fails it) and above run-to-run float noise on one machine kind."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "rows.json").read_text())
REL = 2e-4


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_golden_row_is_reproduced(name, tmp_path):
    from tests import golden_cases as golden_rows
    assert golden_rows.CASES[name] == GOLDEN["cases"][name]["overrides"], "the case changed: rewrite the golden file"
    assert golden_rows.COMMON == GOLDEN["common"]
    got = golden_rows.compute(name, tmp_path)
    want = {k: v for k, v in GOLDEN["cases"][name].items() if k != "overrides"}
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=REL, abs=1e-12 if k.startswith("kld") else 0), (name, k)


def test_golden_rows_come_from_a_clean_commit():
    from spinquant.results import is_uncommitted
    assert not is_uncommitted(GOLDEN["git_rev"])
    assert set(GOLDEN["cases"]) >= {"stories260k-fp", "stories260k-w4a8-rtn", "stories260k-w4a4kv4-quarot-rtn",
                                    "stories260k-w4a4kv4-spinquant-rtn", "stories260k-w4a8-qat-lora", "ref-llama-w4a8-rtn",
                                    "smollm2-135m-w4a8-rtn"}
