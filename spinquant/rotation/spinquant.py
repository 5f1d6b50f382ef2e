"""SpinQuant: learn R1 (residual) and R2 (per head) with Cayley SGD, then fuse them (Liu et al. 2024).

The loss is next-token cross-entropy of the model with activations / KV (and, if asked, weights) fake-
quantized at the target spec; the FP weights stay frozen and are rotated on the fly from the current
R1/R2 (`torch.func.functional_call`), so gradients reach only the rotations. R3/R4 are online Hadamards
as in QuaRot. Rotations start from random Hadamards and stay orthogonal (Cayley retraction). Learned
rotations can be saved and reused; a file saved for another model is rejected.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.adapter import get_adapter
from ..models.state import state_of
from ..quant.apply import quantize_
from ..quant.quantizer import fake_quantize
from ..quant.schemes import QuantConfig
from .cayley import CayleySGD, cosine_lr, orthogonality_error
from .fuse import (
    add_down_hadamard,
    add_qk_hadamard,
    check_sizes,
    fuse_norms,
    rotate_heads,
    rotate_o_heads,
    rotate_reader,
    rotate_residual,
    rotate_v_bias,
    rotate_v_heads,
    rotate_writer,
)
from .online import random_orthogonal_hadamard

FORMAT_VERSION = 1


def model_fingerprint(model) -> dict:
    """Shape facts plus a hash of the embedding table, to refuse rotations learned on another model."""
    a = get_adapter(model)
    emb = a.embedding(model).weight.detach().float()
    digest = hashlib.sha256(emb[: min(64, emb.shape[0])].contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"model_type": model.config.model_type, "hidden": model.config.hidden_size, "head_dim": a.head_dim(model),
            "layers": len(a.decoder_layers(model)), "vocab": emb.shape[0], "embedding_sha": digest}


def save_rotations(path, R1: torch.Tensor, R2s: list[torch.Tensor], fingerprint: dict, meta: dict | None = None):
    """Write learned rotations to `path` (atomically; replaces only an earlier rotation file)."""
    from ..writes import write_file
    with write_file(path, "spinquant rotation", _is_rotation_file, what="rotation file") as tmp:
        torch.save({"format_version": FORMAT_VERSION, "R1": R1.cpu(), "R2": [r.cpu() for r in R2s],
                    "fingerprint": fingerprint, "meta": meta or {}}, tmp)


def _is_rotation_file(path) -> bool:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(blob, dict) and "R1" in blob and "fingerprint" in blob


def load_rotations(path, model, with_meta: bool = False):
    """(R1, R2s) from a file saved by `save_rotations`, checked against `model` (before any fusion);
    with_meta: (R1, R2s, meta) where meta holds the training stats (incl. the train_quant spec)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rotation file {path} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a spinquant rotation file (format_version {FORMAT_VERSION} expected)")
    want, got = model_fingerprint(model), blob["fingerprint"]
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
        what = ", ".join(f"{k} (file {a!r} vs model {b!r})" for k, (a, b) in diff.items())
        raise ValueError(f"{path} was saved for another model: mismatched {what}")
    return (blob["R1"], blob["R2"], blob.get("meta", {})) if with_meta else (blob["R1"], blob["R2"])


def _rotated_params(model, base: dict, R1: torch.Tensor, R2s, weight_spec):
    """{param name: rotated (and optionally fake-quantized) weight} for functional_call. weight_spec: one QuantSpec
    for every decoder linear, or a QuantConfig whose per-module spec is used (group fallback and overrides)."""
    a = get_adapter(model)
    out = {}
    hd = a.head_dim(model)
    dtype = base[a.embed + ".weight"].dtype  # rotate in the model's dtype (bf16 for large models)
    R1, R2s = R1.to(dtype), [R2.to(dtype) for R2 in R2s]

    def wq(W, name):
        spec = weight_spec
        if isinstance(weight_spec, QuantConfig):
            specs = weight_spec.specs_for(name, W.shape[1])
            spec = specs[0] if specs is not None else None
        return fake_quantize(W, spec) if spec is not None and spec.enabled else W

    out[a.embed + ".weight"] = rotate_reader(base[a.embed + ".weight"], R1)
    out[a.lm_head + ".weight"] = rotate_reader(base[a.lm_head + ".weight"], R1)  # lm_head stays 16-bit
    names = a.linear_names()
    for i, R2 in enumerate(R2s):
        pre = f"{a.layers}.{i}."
        w = {role: base[pre + path + ".weight"] for role, path in names.items()}
        for role in ("q", "k", "gate", "up"):
            out[pre + names[role] + ".weight"] = wq(rotate_reader(w[role], R1), pre + names[role])
        out[pre + names["v"] + ".weight"] = wq(rotate_v_heads(rotate_reader(w["v"], R1), R2, hd), pre + names["v"])
        out[pre + names["o"] + ".weight"] = wq(rotate_writer(rotate_o_heads(w["o"], R2, hd), R1), pre + names["o"])
        out[pre + names["down"] + ".weight"] = wq(rotate_writer(w["down"], R1), pre + names["down"])
        if pre + names["v"] + ".bias" in base:
            out[pre + names["v"] + ".bias"] = rotate_v_bias(base[pre + names["v"] + ".bias"], R2, hd)
        for role in ("o", "down"):
            if pre + names[role] + ".bias" in base:
                out[pre + names[role] + ".bias"] = rotate_reader(base[pre + names[role] + ".bias"], R1)
    return out


def train_quant_for(target: QuantConfig) -> dict:
    """The quantization seen while learning rotations for a `target` config (SpinQuant's recipe): the
    target's activation / KV specs, and its weight spec only when RTN follows; when GPTQ (or any
    Hessian-based quantizer) follows, weights stay 16-bit during training (W16A4KV4 for W4A4KV4).
    Departure: a weight-only target followed by GPTQ (W4A16) would then train against nothing quantized, where
    the loss does not depend on the rotation at all; there the weights stay quantized (RTN) in training."""
    from ..quant.registry import get_weight_quantizer
    d = target.to_dict()
    act_or_kv = target.act.enabled or target.kv.enabled
    if not target.weight.enabled or (get_weight_quantizer(target.method).needs_hessian and act_or_kv):
        d["weight"] = {"bits": 16}
    return d


def learn_rotations(model, cfg: dict, calib: torch.Tensor | None = None, target: QuantConfig | None = None) -> dict:
    """Rotate `model` in place with learned R1/R2; returns the training statistics.
    cfg keys (defaults from the official recipe, see `_train`):
    steps 100, lr 1.5, schedule cosine, batch_size 8 (global), micro_batch_size 1, max_grad_norm 1.0, retraction
    exact, heldout 8, seed, fallback, r3, r4, train_quant ('auto': derived from `target`
    by `train_quant_for`, or a quant config dict such as {scheme: W4A4KV4, weight: {bits: 16}}), load
    (a saved rotation file to reuse instead of training), save (where to write the learned rotations),
    progress. calib: token ids [samples, seq_len]; the last `heldout` rows are held back to measure the objective."""
    a = get_adapter(model)
    seed, fallback = int(cfg.get("seed", 0)), cfg.get("fallback", "error")
    hidden, hd = model.config.hidden_size, a.head_dim(model)
    n_layers = len(a.decoder_layers(model))
    check_sizes(model, fallback)
    fingerprint = model_fingerprint(model)

    if cfg.get("load"):
        R1, R2s, meta = load_rotations(cfg["load"], model, with_meta=True)
        stats = {"loaded_from": str(cfg["load"]), "train_quant": meta.get("train_quant")}
        _prepare(model, cfg, fallback)  # the training run's order (online R3/R4 before R1/R2): bit-identical weights
        rotate_residual(model, R1.double())
        rotate_heads(model, [r.double() for r in R2s])
    else:
        if calib is None:
            raise ValueError("spinquant needs calibration token ids to learn rotations (or rotation.load=<file>)")
        tq = cfg.get("train_quant") or "auto"
        if tq == "auto":
            if target is None:
                raise ValueError("rotation.train_quant=auto needs the target quantization config; pass target= "
                                 "or give train_quant explicitly (e.g. {scheme: W4A4KV4, weight: {bits: 16}})")
            tq = train_quant_for(target)
        # trains on `model` itself (norms folded, online Hadamards in place): no second copy of the weights
        R1, R2s, stats = _train(model, {**cfg, "train_quant": tq}, calib, seed, fallback, hidden, hd, n_layers)
        rotate_residual(model, R1.double())
        rotate_heads(model, [r.double() for r in R2s])
        if cfg.get("save") and _data_parallel()[0] == 0:
            save_rotations(cfg["save"], R1, R2s, fingerprint, stats)
    return stats


def _data_parallel():
    """(rank, world size, device) when launched by `accelerate launch` / torchrun, else (0, 1, None).

    Rotation training is data-parallel: every process holds the frozen model and the same R1/R2, takes
    its share of each global batch, and the (tiny) rotation gradients are averaged before the identical
    Cayley step, so all processes stay in sync without wrapping the model."""
    import os

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():  # a process group set up by the caller
        return dist.get_rank(), dist.get_world_size(), None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group (gloo on CPU, nccl on GPUs)
    return state.process_index, state.num_processes, state.device


def _strip_quantizers(model) -> None:
    """Remove the training-time activation / KV quantizers; the linears stay FP (QuantLinear, no qweight)."""
    a = get_adapter(model)
    for layer in a.decoder_layers(model):
        for lin in a.layer_linears(layer).values():
            lin.act_spec = None
        a.attention(layer).kv_quantizer = None
    state_of(model).quant = None


def _prepare(model, cfg: dict, fallback: str) -> None:
    """Norms folded and the online R3 / R4 Hadamards in place: the model R1 / R2 are learned on and fused into."""
    fuse_norms(model)
    if cfg.get("r3", True):
        add_qk_hadamard(model, fallback)
    if cfg.get("r4", True):
        add_down_hadamard(model, fallback)


def quantizes_nothing(tq: QuantConfig) -> bool:
    """Whether training under `tq` sees no quantization at all (decoder weights, their inputs, the KV cache: what
    the training loop quantizes): its objective is then exactly rotation-invariant, so training learns nothing."""
    specs = [tq.weight, tq.act, tq.kv]
    for o in tq.overrides:
        if not o.skip:
            specs += [o.over(tq.weight, "weight"), o.over(tq.act, "act")]
    return not any(s.enabled for s in specs)


def check_config(cfg: dict, world: int = 1, target: QuantConfig | None = None) -> None:
    """The training settings' errors, raised before any model is loaded (the pipeline's preflight calls this first,
    with the run's quant config as `target`)."""
    schedule, retraction = cfg.get("schedule", "cosine"), cfg.get("retraction", "exact")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"rotation.schedule must be 'cosine' or 'constant', got {schedule!r}")
    if retraction not in ("exact", "iterative"):
        raise ValueError(f"rotation.retraction must be 'exact' or 'iterative', got {retraction!r}")
    ints = {k: int(cfg.get(k, d)) for k, d in (("steps", 100), ("batch_size", 8), ("micro_batch_size", 1),
                                                ("heldout", 8))}
    if min(ints.values()) < 1 or float(cfg.get("lr", 1.5)) <= 0:
        raise ValueError(f"rotation.lr must be > 0 and {', '.join(ints)} >= 1, got lr={cfg.get('lr', 1.5)}, {ints}")
    if ints["batch_size"] % world:
        raise ValueError(f"rotation.batch_size={ints['batch_size']} (global) must be a multiple of the {world} processes")
    if cfg.get("save"):  # the rotation file's place, before hours of training
        from ..writes import check_file
        check_file(cfg["save"], "spinquant rotation", _is_rotation_file, what="rotation file (rotation.save)")
    tq = cfg.get("train_quant") or "auto"
    if tq == "auto":
        tq = train_quant_for(target) if target is not None else None
    if tq is not None:
        tq = tq if isinstance(tq, QuantConfig) else QuantConfig.from_dict(dict(tq))
        if quantizes_nothing(tq):
            raise ValueError("rotation=spinquant would train against nothing quantized (training quantization "
                             f"{tq.label()}): its objective does not depend on the rotation, so it would learn "
                             "nothing. Use rotation=quarot for fixed Hadamards, or set rotation.train_quant to the "
                             "quantization to train against (e.g. {scheme: W4A16})")


def paired_se(before: list[float], after: list[float]) -> float | None:
    """Standard error of the mean of the paired differences after - before (equal-size parts: the held-back
    sequences, one per micro-batch by default); None with fewer than two parts."""
    n = len(before)
    if n < 2 or len(after) != n:
        return None
    d = [a - b for a, b in zip(after, before)]
    m = sum(d) / n
    return (sum((x - m) ** 2 for x in d) / (n - 1) / n) ** 0.5


def _objective(work, params: dict, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `work` with weights `params` (rotated, see `_rotated_params`) on x [b, seq]."""
    logits = torch.func.functional_call(work, params, (x,), {"use_cache": False}).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def _accumulated_objective(work, base, R1, R2s, weight_spec, xs: torch.Tensor, micro: int, backward: bool,
                           parts: list | None = None):
    """Mean objective over xs [n, seq] in micro-batches; with `backward`, its gradient accumulated into R1 / R2s.
    The rotated (and fake-quantized) weights are built once: each micro-batch back-propagates to them only, and
    their summed gradient goes through the rotation once (exact; the weight side, e.g. RTN's MSE clip search,
    is not recomputed per micro-batch). `parts`, if given, receives each micro-batch's own mean."""
    with torch.set_grad_enabled(backward):
        params = _rotated_params(work, base, R1, R2s, weight_spec)
    leaves = {k: v.detach().requires_grad_(backward) for k, v in params.items()}
    total = 0.0
    for i in range(0, len(xs), micro):
        x = xs[i:i + micro]
        with torch.set_grad_enabled(backward):
            mean = _objective(work, leaves, x)
            part = mean * (len(x) / len(xs))  # equal-length sequences: size-weighted means
        if backward:
            part.backward()
        total += part.item()
        if parts is not None:
            parts.append(mean.item())
    if backward:
        keys = [k for k in params if leaves[k].grad is not None]
        torch.autograd.backward([params[k] for k in keys], [leaves[k].grad for k in keys])
    return total


def _batches(n: int, batch: int, steps: int, g: torch.Generator):
    """Index batches for `steps` steps: consecutive slices of seeded permutations of range(n), a new
    permutation whenever one is used up (the official run passes over its 800 samples once: 100 × 8)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < batch:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield order[:batch]
        order = order[batch:]


def _train(model, cfg, calib, seed, fallback, hidden, hd, n_layers):
    """Learn (R1, R2s) on `model`, which it leaves with norms folded and R3/R4 in place (FP function kept).

    The official recipe (scripts/10_optimize_rotation.sh on transformers' Trainer): SGDG (`CayleySGD`), lr with
    a cosine schedule over `steps`, a global batch of `batch_size` sequences (8 processes × 1 there; here
    gradient accumulation over micro-batches of `micro_batch_size`, split over data-parallel processes), the
    gradient clipped to global norm `max_grad_norm` (the Trainer's default 1.0, which the script keeps). The last
    `heldout` calibration sequences are never trained on: the objective on them is recorded before and after."""
    torch.manual_seed(seed)
    rank, world, dp_device = _data_parallel()
    check_config(cfg, world)
    steps, lr = int(cfg.get("steps", 100)), float(cfg.get("lr", 1.5))
    bs, micro = int(cfg.get("batch_size", 8)), int(cfg.get("micro_batch_size", 1))
    heldout, schedule = int(cfg.get("heldout", 8)), cfg.get("schedule", "cosine")
    max_norm = cfg.get("max_grad_norm", 1.0)
    if calib.shape[0] <= heldout:
        raise ValueError(f"spinquant needs more calibration sequences than rotation.heldout={heldout} "
                         f"(got {calib.shape[0]}): the held-back ones measure the objective before and after")
    train, held = calib[:-heldout], calib[-heldout:]
    work = model
    if dp_device is not None:
        work.to(dp_device)
    _prepare(work, cfg, fallback)
    tq = QuantConfig.from_dict(dict(cfg["train_quant"]))
    weight_spec = tq  # per module: the group fallback and overrides of the run's config, as quantize_ applies them
    act_overrides = tuple(replace(o, weight={}) for o in tq.overrides)
    quantize_(work, QuantConfig(act=tq.act, kv=tq.kv, overrides=act_overrides), progress=False)  # act / KV only
    requires = {n: p.requires_grad for n, p in work.named_parameters()}
    for p in work.parameters():
        p.requires_grad_(False)
    base = {k: v.detach() for k, v in work.named_parameters()}
    device = next(work.parameters()).device
    R1 = nn.Parameter(random_orthogonal_hadamard(hidden, seed, fallback).float().to(device))
    R2s = [nn.Parameter(random_orthogonal_hadamard(hd, seed + 1 + i, fallback).float().to(device))
           for i in range(n_layers)]
    rotations = [R1, *R2s]
    opt = CayleySGD(rotations, lr=lr, retraction=cfg.get("retraction", "exact"), seed=seed)

    def heldout_loss() -> tuple[float, list[float]]:
        parts = []
        mean = _accumulated_objective(work, base, R1, R2s, weight_spec, held.to(device), micro, backward=False,
                                      parts=parts)
        return mean, parts

    before, before_parts = heldout_loss()
    g = torch.Generator().manual_seed(seed)  # same draws on every process: one global batch per step
    losses, lrs, alphas, t0 = [], [], [], time.time()
    bar = tqdm(range(steps), desc="spinquant R1/R2", disable=cfg.get("progress") is False or rank != 0)
    for step, idx in zip(bar, _batches(train.shape[0], bs, steps, g)):
        mine = idx[rank::world]  # this process's share of the global batch
        opt.zero_grad(set_to_none=True)
        loss = torch.tensor(_accumulated_objective(work, base, R1, R2s, weight_spec, train[mine].to(device), micro,
                                                   backward=True), dtype=torch.float64, device=device)  # nccl: on GPU
        if world > 1:  # equal shares: the mean of the per-process means is the global mean
            import torch.distributed as dist
            for R in rotations:
                dist.all_reduce(R.grad)
                R.grad /= world
            dist.all_reduce(loss)
            loss /= world
        if max_norm:
            torch.nn.utils.clip_grad_norm_(rotations, float(max_norm))
        step_lr = cosine_lr(lr, step, steps) if schedule == "cosine" else lr
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.step()
        losses.append(loss.item())
        lrs.append(step_lr)
        alphas.append(opt.last_alpha[0])  # R1's step after the cap
        bar.set_postfix(loss=f"{loss.item():.3f}", step=f"{alphas[-1]:.3g}")
    after, after_parts = heldout_loss()
    _strip_quantizers(work)
    for n, p in work.named_parameters():
        p.requires_grad_(requires.get(n, False))
    err = max(orthogonality_error(R) for R in rotations)
    stats = {"steps": steps, "lr": lr, "schedule": schedule, "batch_size": bs, "micro_batch_size": micro,
             "processes": world, "max_grad_norm": max_norm, "retraction": opt.defaults["retraction"],
             "samples": int(train.shape[0]), "heldout": heldout, "seq_len": int(calib.shape[1]),
             "train_s": time.time() - t0, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
             "lrs": lrs, "r1_step": alphas, "heldout_loss_before": before, "heldout_loss_after": after,
             "heldout_losses_before": before_parts, "heldout_losses_after": after_parts,
             "heldout_delta_se": paired_se(before_parts, after_parts) if heldout % micro == 0 else None,
             "orthogonality_error": err, "train_quant": tq.to_dict()}
    return R1.detach().cpu(), [r.detach().cpu() for r in R2s], stats
