"""Quantization-aware training: `prepare` (fake-quant linears, LoRA), `train` (accelerate loop),
`convert` (back to the quantized model spinquant evaluates). Methods: none | full | lora."""
from __future__ import annotations

import copy

from ..models.state import state_of
from .fake_quant import FakeQuantLinear, QATConfig, convert, prepare
from .loop import TrainConfig, train
from .lora import LoRA

METHODS = ("none", "full", "lora")
__all__ = ["FakeQuantLinear", "LoRA", "QATConfig", "TrainConfig", "check_rotation_spec", "convert", "prepare", "run",
           "train"]


def check_rotation_spec(model, quant) -> None:
    """Refuse QAT at a spec other than the one a loaded SpinQuant rotation was learned for (act / KV bits)."""
    state = state_of(model).rotation
    st = state.stats if state is not None else {}
    tq = st.get("train_quant")
    if not tq:
        return
    got = {k: tq.get(k, {}).get("bits", 16) for k in ("act", "kv")}
    want = {"act": quant.act.bits, "kv": quant.kv.bits}
    if got != want:
        raise ValueError(f"QAT spec A{want['act']}KV{want['kv']} disagrees with the rotation "
                         f"{st.get('loaded_from', '(trained in this run)')}, learned for A{got['act']}KV{got['kv']}; "
                         f"learn rotations for this scheme or pick the matching quant config")


def run(model, cfg: dict, quant, tokens, out_dir=None, run_config: dict | None = None):
    """prepare -> train -> convert, in place, as configured by a `configs/qat/*.yaml` dict. Returns stats."""
    name = cfg.get("name", "none")
    if name not in METHODS:
        raise ValueError(f"unknown qat method {name!r}; available: {', '.join(METHODS)}")
    if name == "none":
        return None
    check_rotation_spec(model, quant)
    lora = cfg.get("lora") or {}
    qcfg = QATConfig(mode=name, scales=cfg.get("scales", "fixed"), lora_rank=lora.get("rank", 16),
                     lora_alpha=lora.get("alpha", 32.0), lora_dropout=lora.get("dropout", 0.0),
                     lora_targets=tuple(lora.get("targets", QATConfig.lora_targets)), qa_lora=lora.get("qa_lora", False))
    tcfg = TrainConfig(**{**(cfg.get("train") or {}), "out_dir": str(out_dir) if out_dir else None})
    teacher = copy.deepcopy(model).eval() if tcfg.kd_weight > 0 else None
    prepare(model, quant, qcfg)
    model, stats = train(model, tokens, tcfg, teacher=teacher, run_config=run_config)
    convert(model, merge=bool(cfg.get("merge", False)))
    return stats
