"""`quantize_(model, config, calib)`: swap a model's linears for fake-quant ones, in place.

Weights that need calibration (GPTQ) are processed decoder layer by decoder layer: the calibration
activations entering layer i are produced by the already-quantized layers < i, and within a layer the
linears go in forward order ([q,k,v] -> o -> [gate,up] -> down), so memory stays at one layer's
activations. Activation quantizers are installed after all weights are done.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..models.adapter import FamilyAdapter, get_adapter
from ..models.attention import use_spinquant_attention
from ..models.state import state_of
from ..numerics import check_finite_weights
from .gptq import HessianAccumulator
from .linear import KVQuantizer, QuantEmbedding, QuantLinear
from .quantizer import fake_quantize
from .registry import get_weight_quantizer
from .rtn import rtn
from .schemes import FP, QuantConfig
from .spec import QuantSpec

SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def set_module(parent: nn.Module, path: str, module: nn.Module) -> None:
    head, _, leaf = path.rpartition(".")
    setattr(parent.get_submodule(head) if head else parent, leaf, module)


def _weight_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the weight multiplies: the input after the module's online transform, if it has one."""
    t = getattr(module, "input_transform", None)
    return t(x) if t is not None else x


def check_not_quantized(model, adapter: FamilyAdapter) -> None:
    """Refuse a model that already carries quantized weights, activation / KV quantizers or a quant config."""
    done = state_of(model).quant
    if done is None:
        for layer in adapter.decoder_layers(model):
            lins = adapter.layer_linears(layer).values()
            if any(getattr(m, "qweight", None) is not None or getattr(m, "act_spec", None) is not None for m in lins) \
                    or getattr(adapter.attention(layer), "kv_quantizer", None) is not None:
                done = "an earlier quantization"
                break
    if done is not None:
        what = done.label() if isinstance(done, QuantConfig) else done
        raise ValueError(f"model is already quantized ({what}); quantize a fresh (or only rotated) FP model instead "
                         f"of applying a second config on top")


def _check_widths(widths: dict[str, int], head_dim: int, hidden: int, config: QuantConfig, where: str = "") -> None:
    for role, n in widths.items():
        config.weight_spec_for(n, f"{where}{role}_proj weight")
        config.act.check_shape(n, f"{where}{role}_proj input")
    config.kv.check_shape(head_dim, "keys/values (head_dim)")
    for name in ("embed", "lm_head", "lm_head_act"):
        getattr(config, name).check_shape(hidden, name)


def check_shapes(model, adapter: FamilyAdapter, config: QuantConfig) -> None:
    for i, layer in enumerate(adapter.decoder_layers(model)):
        widths = {role: lin.in_features for role, lin in adapter.layer_linears(layer).items()}
        _check_widths(widths, adapter.head_dim(model), model.config.hidden_size, config, f"layer {i} ")


def check_config_shapes(model_config, config: QuantConfig) -> None:
    """The group-size checks of `quantize_`, from the model's config alone (before its weights are loaded)."""
    from ..models.adapter import adapter_for_model_type
    a = adapter_for_model_type(model_config.model_type)
    widths = a.linear_in_features(model_config)
    _check_widths(widths, a.head_dim(model_config), model_config.hidden_size, config)
    names = {f"{a.layers}.{i}.{path}": widths[role] for i in range(model_config.num_hidden_layers)
             for role, path in a.linear_names().items()}
    config.check_overrides(names)
    for name, n in names.items():
        config.specs_for(name, n)  # an override's group size against its modules' widths


@torch.no_grad()
def _capture_layer_inputs(model, adapter: FamilyAdapter, calib: torch.Tensor, batch_size: int):
    """Run calib [n, seq] up to the first decoder layer; return per-batch (hidden, kwargs)."""
    layers = adapter.decoder_layers(model)
    caught = []

    class Stop(Exception):
        pass

    class Catcher(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden, **kwargs):
            caught.append((hidden, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}))
            raise Stop

    layers[0] = Catcher(layers[0])
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i: i + batch_size].to(model.device), use_cache=False)
            except Stop:
                pass
    finally:
        layers[0] = layers[0].inner
    return caught


@torch.no_grad()
def _quantize_weights_calibrated(model, adapter, config, calib, batch_size, progress, specs):
    """Layer by layer, group by group. With config.calib_act_quant the calibration inputs are the quantized
    model's: every already-quantized linear quantizes its input activations, attention quantizes K/V, and the
    Hessian is built from the activations each weight really multiplies (fake-quantized), as llm-compressor /
    GPTQModel calibrate W4A8 models. Without it, earlier layers' weights are quantized but activations stay FP."""
    wq = get_weight_quantizer(config.method)
    act_on = config.calib_act_quant and config.act.enabled
    inputs = _capture_layer_inputs(model, adapter, calib, batch_size)
    layers = adapter.decoder_layers(model)

    def weight_input(m, x, act):
        x = _weight_input(m, x)
        return fake_quantize(x, act) if act_on else x

    for li in tqdm(range(len(layers)), desc=f"{config.method} layers", disable=not progress):
        layer = layers[li]
        paths = adapter.linear_names()
        if config.calib_act_quant and config.kv.enabled:
            adapter.attention(layer).kv_quantizer = KVQuantizer(config.kv, config.kv)
        for group in SEQUENTIAL_GROUPS:
            accs = {role: HessianAccumulator(layer.get_submodule(paths[role]).in_features,
                                             f"{adapter.layers}.{li}.{paths[role]}") for role in group}
            hooks = [layer.get_submodule(paths[r]).register_forward_hook(
                lambda m, inp, out, r=r, accs=accs: accs[r].add(weight_input(m, inp[0], specs[li][r][1]))) for r in group]
            for hidden, kw in inputs:
                layer(hidden, **kw)
            for h in hooks:
                h.remove()
            for role in group:
                lin = layer.get_submodule(paths[role])
                w_spec, act = specs[li][role]
                qw = wq.fn(lin.weight.data.float(), w_spec, hessian=accs[role].hessian(),
                           **config.method_options) if w_spec.enabled else None
                set_module(layer, paths[role], QuantLinear.from_linear(lin, qw, act if act_on and act.enabled else None))
        inputs = [(layer(hidden, **kw), kw) for hidden, kw in inputs]


def _check_options(wq, options: dict) -> None:
    """Clear error for method_options the quantizer does not take (instead of a TypeError mid-model)."""
    import inspect
    params = inspect.signature(wq.fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    known = list(params)[3:]  # after (weight, spec, hessian)
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise ValueError(f"quant.method_options {unknown} are not options of weight quantizer {wq.name!r} "
                         f"(it takes: {', '.join(known) or 'none'})")


def linear_specs(model, config: QuantConfig, filter_fn=None) -> list[dict[str, tuple[QuantSpec, QuantSpec]]]:
    """Per decoder layer, role -> (weight spec, input activation spec) of each linear after `config.overrides`
    and `filter_fn(module, name) -> bool` (False or a `skip` override: both specs FP). Every override pattern
    must match some linear."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    out, all_names = [], []
    for layer in adapter.decoder_layers(model):
        per = {}
        for role, lin in adapter.layer_linears(layer).items():
            name = names[id(lin)]
            all_names.append(name)
            specs = config.specs_for(name, lin.in_features)
            if specs is None or (filter_fn is not None and not filter_fn(lin, name)):
                specs = (FP, FP)
            per[role] = specs
        out.append(per)
    config.check_overrides(all_names)
    return out


def quantize_(model: nn.Module, config: QuantConfig, calib: torch.Tensor | None = None, batch_size: int = 8,
              progress: bool = True, filter_fn=None) -> nn.Module:
    """Quantize `model` in place according to `config`; `calib` [n, seq] token ids for calibrated methods.
    filter_fn(module, name) -> bool (torchao's convention): decoder linears (and the lm_head) for which it
    returns False stay in full precision; `config.overrides` change or skip modules by name pattern.
    A model that is already quantized is refused (a second config would silently stack on the first)."""
    if isinstance(config, str):
        raise TypeError(f"quantize_ takes a QuantConfig, not the string {config!r}: "
                        f"quantize_(model, QuantConfig(scheme={config!r}))")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_ takes a QuantConfig (e.g. QuantConfig(scheme='W4A8')), got {type(config).__name__}")
    adapter = get_adapter(model)
    check_not_quantized(model, adapter)
    check_shapes(model, adapter, config)
    check_finite_weights(model, "quantization")
    specs = linear_specs(model, config, filter_fn)
    wq = get_weight_quantizer(config.method)
    _check_options(wq, config.method_options)
    use_spinquant_attention(model)
    layers = adapter.decoder_layers(model)

    if config.weight.enabled and wq.needs_hessian:
        if calib is None:
            raise ValueError(f"weight quantizer {config.method!r} needs calibration data (calib token ids [n, seq])")
        _quantize_weights_calibrated(model, adapter, config, calib, batch_size, progress, specs)
    else:
        for i, layer in enumerate(layers):
            for role, path in adapter.linear_names().items():
                lin = layer.get_submodule(path)
                spec = specs[i][role][0]
                qw = wq.fn(lin.weight.data.float(), spec, **config.method_options) if spec.enabled else None
                set_module(layer, path, QuantLinear.from_linear(lin, qw))

    for i, layer in enumerate(layers):  # activation and KV quantizers
        for role, path in adapter.linear_names().items():
            act = specs[i][role][1]
            layer.get_submodule(path).act_spec = act if act.enabled else None
        attn = adapter.attention(layer)
        attn.kv_quantizer = KVQuantizer(config.kv, config.kv) if config.kv.enabled else None

    quantize_embeddings(model, adapter, config, filter_fn)
    state_of(model).quant = config
    return model


def quantize_embeddings(model, adapter: FamilyAdapter, config: QuantConfig, filter_fn=None) -> None:
    """Embedding / lm_head at 8-bit (or whatever the config says); unties them if only one is quantized."""
    if filter_fn is not None and config.lm_head.enabled and not filter_fn(adapter.head(model), adapter.lm_head):
        config = replace(config, lm_head=FP, lm_head_act=FP)
    if not (config.embed.enabled or config.lm_head.enabled):
        return
    if adapter.tied_embeddings(model):
        head = adapter.head(model)
        head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    if config.embed.enabled:
        emb = adapter.embedding(model)
        qw = rtn(emb.weight.data.float(), config.embed)
        set_module(model, adapter.embed, QuantEmbedding(qw, emb.padding_idx))
    if config.lm_head.enabled:
        head = adapter.head(model)
        qw = rtn(head.weight.data.float(), config.lm_head)
        set_module(model, adapter.lm_head, QuantLinear.from_linear(head, qw, config.lm_head_act))
