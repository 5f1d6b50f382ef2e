"""The worked extension example (examples/hqq_quantizer.py + configs/quant/w4a16_hqq.yaml, docs/extending.md):
the quantizer is better than RTN at what it optimizes, and the example runs end to end through run.py."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    from spinquant.quant import WEIGHT_QUANTIZERS
    if "hqq" not in WEIGHT_QUANTIZERS:
        spec = importlib.util.spec_from_file_location("hqq_example", ROOT / "examples/hqq_quantizer.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return WEIGHT_QUANTIZERS["hqq"]


def test_hqq_lowers_the_lp_error_it_optimizes_against_rtn_on_heavy_tailed_weights():
    from spinquant.quant import QuantSpec, get_weight_quantizer
    hqq = _load_example()
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02  # heavy tails, like real weights
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64)
    q_h, q_r = hqq.fn(w, spec, p=0.7), get_weight_quantizer("rtn").fn(w, spec)
    assert int(q_h.codes.min()) >= spec.qmin and int(q_h.codes.max()) <= spec.qmax

    def lp(q, p=0.7):  # per group, as the quantizer optimizes it
        return (q.dequantize() - w).abs().pow(p).reshape(64, 4, 64).sum(-1)

    assert (lp(q_h) <= lp(q_r) * (1 + 1e-6)).all()  # RTN's zero is a candidate: never worse per group
    assert lp(q_h).sum() < 0.97 * lp(q_r).sum()
    assert torch.allclose(q_h.scale, q_r.scale)  # only the zero points move, and they are fractional
    assert not torch.equal(q_h.zero, q_h.zero.round())
    with pytest.raises(ValueError, match="asymmetric spec"):
        hqq.fn(w, QuantSpec(bits=4, symmetric=True))


def test_example_runs_end_to_end_and_its_size_counts_fractional_zeros(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from spinquant import cli as run_mod
    base = ["model=stories260k", f"results_dir={tmp_path}", "experiment_name=ext", "progress=false", "wandb.mode=disabled",
            "eval.datasets=[wikitext2]", "eval.max_windows=2", "eval.seq_len=128", "quant.group_fallback=channel"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*base, "quant=w4a16_hqq", f"plugins=[{ROOT / 'examples/hqq_quantizer.py'}]"])
        rtn = compose("config", overrides=[*base, "quant=w4a16_hqq", "quant.method=rtn"])
        bad = compose("config", overrides=[*base, "quant=w4a16_hqq", "plugins=[no_such_module_xyz]"])
    row = run_mod.run_hydra(cfg)
    with pytest.raises(ValueError, match=r"method_options \['iters', 'p'\] are not options of weight quantizer 'rtn'"):
        run_mod.run_hydra(rtn)
    with open_dict(rtn):
        rtn.quant.method_options = {}
    ref = run_mod.run_hydra(rtn)
    assert row["method"]["weights"] == "hqq" and row["scheme"] == "W4A16"
    assert 1 < row["metrics"]["ppl"]["wikitext2"] < 1.5 * ref["metrics"]["ppl"]["wikitext2"]
    # same codes and scales, fp16 instead of 4-bit zero points: 12 more bits per group
    assert row["metrics"]["size_bytes"] > ref["metrics"]["size_bytes"]
    with pytest.raises(ModuleNotFoundError, match="plugin 'no_such_module_xyz' cannot be imported"):
        run_mod.run_hydra(bad)
