"""The QAT training loop, on accelerate: the same code on 1 CPU, several CPU processes (gloo) and GPUs
(DDP; FSDP through an accelerate config). Short on purpose (nanoGPT-style).

Batches are a pure function of (seed, step): every step draws `batch_size` windows from the training
tokens, each process takes its share and splits it into micro-batches (gradient accumulation). So the
trained weights do not depend on the number of processes (same global batch), and a resumed run repeats
exactly what the killed one would have done.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..eval.memory import PeakMemory
from ..tracking import wandb_settings


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8            # sequences per optimizer step, across all processes
    micro_batch_size: int = 4      # sequences per forward pass in one process
    seq_len: int = 512
    lr: float = 1e-4
    min_lr_frac: float = 0.1       # cosine decay to lr·min_lr_frac after `warmup` linear steps
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0         # 0 = off
    kd_weight: float = 0.0         # loss = (1-w)·CE + w·T²·KL(teacher ‖ student), teacher = the FP model
    kd_temperature: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | bf16 | no
    checkpoint_every: int = 0      # steps between checkpoints (0: only at the end); needs out_dir
    out_dir: str | None = None     # checkpoint + wandb folder; a rerun resumes from its checkpoint
    seed: int = 0
    wandb_mode: str = "offline"    # offline | online | disabled
    wandb_project: str = "spinquant"
    wandb_group: str | None = None
    progress: bool = True


def batch_for_step(tokens: torch.Tensor, step: int, cfg: TrainConfig) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows of `tokens` for optimizer step `step` (same on every process)."""
    if tokens.numel() <= cfg.seq_len + 1:
        raise ValueError(f"training text has {tokens.numel()} tokens, fewer than one window of {cfg.seq_len + 1}")
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    return torch.stack([tokens[s:s + cfg.seq_len + 1] for s in starts.tolist()])


def _lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def _loss(model, teacher, x, cfg: TrainConfig):
    inp, tgt = x[:, :-1], x[:, 1:]
    logits = model(inp, use_cache=False).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    if teacher is None or cfg.kd_weight == 0:
        return ce
    with torch.no_grad():
        t_logits = teacher(inp, use_cache=False).logits.float()
    T = cfg.kd_temperature
    kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                  reduction="batchmean") * T * T / inp.shape[1]  # per token
    return (1 - cfg.kd_weight) * ce + cfg.kd_weight * kl


def train(model, tokens: torch.Tensor, cfg: TrainConfig, teacher=None, run_config: dict | None = None):
    """Train the parameters of `model` that require grad on next-token loss over `tokens` [N].

    Returns (model, stats); stats has losses, tokens trained, trainable parameters, wall time, tokens/s
    and peak memory. Checkpoints (model, optimizer, scheduler) go to out_dir/checkpoint atomically.
    """
    from accelerate import Accelerator
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    acc = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of processes × micro_batch_size "
                         f"({world} × {cfg.micro_batch_size})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (did you call qat.prepare?)")
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    # the scheduler is stepped by hand, once per optimizer step: accelerate's prepared scheduler would step
    # once per process (it assumes more processes = fewer steps), changing the schedule with the world size
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    if teacher is not None:
        teacher = teacher.to(acc.device).eval().requires_grad_(False)

    start, losses, prior_s = 0, [], 0.0
    ckpt = Path(cfg.out_dir) / "checkpoint" if cfg.out_dir else None
    if ckpt is not None and ckpt.exists() and not (ckpt / "trainer.json").is_file():  # never replace what it did not write
        raise FileExistsError(f"{ckpt} exists and is not a QAT checkpoint (no trainer.json); move it away or set "
                              f"checkpoint_dir to another folder")
    if ckpt is not None and (ckpt / "trainer.json").is_file():
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer.json").read_text())
        # train_s: seconds spent on the checkpointed steps by earlier processes (None: a checkpoint from before
        # it was recorded, so the run's training time is unknown)
        start, losses, prior_s = state["step"], state["losses"], state.get("train_s")

    run, own_run = None, False
    if acc.is_main_process and cfg.wandb_mode != "disabled":
        import wandb
        if wandb.run is not None:  # experiments/run.py opened the experiment's run: log the training into it
            run = wandb.run
        else:
            run, own_run = wandb.init(project=cfg.wandb_project, group=cfg.wandb_group, mode=cfg.wandb_mode,
                                      dir=cfg.out_dir or None, config={"train": asdict(cfg), **(run_config or {})},
                                      settings=wandb_settings(wandb), resume="allow"), True

    local = cfg.batch_size // world
    n_micro = local // cfg.micro_batch_size
    model.train()
    t0, tokens_seen = time.time(), 0
    bar = tqdm(range(start, cfg.steps), desc="qat", disable=not cfg.progress or not acc.is_main_process,
               initial=start, total=cfg.steps)
    with PeakMemory(str(acc.device)) as mem:  # the peak during training (CUDA allocator / sampled RSS)
        for step in bar:
            x = batch_for_step(tokens, step, cfg)[rank * local:(rank + 1) * local].to(acc.device)
            total = torch.zeros((), device=acc.device)
            for i, mb in enumerate(x.split(cfg.micro_batch_size)):
                sync = contextlib.nullcontext() if i == n_micro - 1 else acc.no_sync(model)
                with sync, acc.autocast():
                    loss = _loss(model, teacher, mb, cfg) / n_micro
                acc.backward(loss)
                total += loss.detach()
            if cfg.grad_clip:
                acc.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_val = acc.reduce(total, reduction="mean").item()
            losses.append(loss_val)
            tokens_seen += cfg.batch_size * cfg.seq_len
            tps = tokens_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:.0f}")
            if run is not None:
                run.log({"train/loss": loss_val, "train/lr": sched.get_last_lr()[0], "train/tokens_per_s": tps}, step=step)
            last = step + 1 == cfg.steps
            if ckpt is not None and (last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
                done_s = None if prior_s is None else prior_s + time.time() - t0
                _save_checkpoint(acc, ckpt, step + 1, losses, done_s)
    wall = time.time() - t0
    # a resumed run's training time is the earlier processes' time on its checkpointed steps plus this one's
    train_s = None if prior_s is None else prior_s + wall
    train_tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    stats = {"steps": cfg.steps, "resumed_from": start, "losses": losses, "loss_last": losses[-1] if losses else None,
             "train_tokens": train_tokens, "trainable_params": n_trainable,
             "train_s": train_s, "prior_train_s": prior_s if start else 0.0,
             "tokens_per_s": train_tokens / train_s if train_s else None,
             "peak_mem_bytes": mem.peak_bytes, "peak_mem_delta_bytes": mem.peak_delta_bytes, "processes": world,
             "mixed_precision": mp}
    if run is not None:
        run.summary.update({f"qat_train/{k}": v for k, v in stats.items() if k != "losses"})
        if own_run:
            run.finish()
    model = acc.unwrap_model(model)
    model.eval()
    return model, stats


def _save_checkpoint(acc, ckpt: Path, step: int, losses: list[float], train_s: float | None) -> None:
    """accelerate state + trainer.json (steps done, their losses and training seconds) into a temporary folder,
    then renamed over the old checkpoint."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "losses": losses, "train_s": train_s}))
        old = ckpt.with_name(ckpt.name + ".old")
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        if old.exists():
            import shutil
            shutil.rmtree(old)
    acc.wait_for_everyone()
