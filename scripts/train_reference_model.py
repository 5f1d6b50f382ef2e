"""Train the shipped reference model: a small Llama-family LM on WikiText-2 train.

Writes an HF folder (config.json, tokenizer, bf16 model.safetensors) plus `training_log.json`
(the loss curve). Shape is chosen to exercise what real models need: GQA, RoPE, SwiGLU, RMSNorm,
head_dim 64, and a hidden size (384 = 12·32) that is not a power of two.

    python scripts/train_reference_model.py --out spinquant/assets/ref-llama --time-budget-min 60
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.data import data_root  # noqa: E402


def train_tokenizer(train_file: Path, vocab_size: int, out: Path):
    """Byte-level BPE (GPT-2 style) with <s>, </s>, <unk>, <pad> specials; saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    fast.model_max_length = 4096
    fast.save_pretrained(out)
    return fast


def encode_file(tok, path: Path) -> torch.Tensor:
    text = path.read_text(encoding="utf-8")
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("spinquant/assets/ref-llama"))
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=0, help="0: derive from --time-budget-min")
    p.add_argument("--time-budget-min", type=float, default=60.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on CPUs with AVX512-BF16/AMX)")
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    root = args.data_root or data_root()
    train_file, valid_file = root / "wikitext-2/train.txt", root / "wikitext-2/valid.txt"
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    tok = train_tokenizer(train_file, args.vocab_size, args.out)
    train_ids, valid_ids = encode_file(tok, train_file), encode_file(tok, valid_file)
    print(f"tokenizer: vocab {len(tok)}, train {train_ids.numel():,} tokens, valid {valid_ids.numel():,}"
          f" ({time.time() - t0:.0f}s)", flush=True)

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)

    def batch():
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        return torch.stack([train_ids[s: s + args.seq_len] for s in starts])

    @torch.no_grad()
    def val_loss(n_windows=32):
        model.eval()
        n = min(n_windows, valid_ids.numel() // args.seq_len)
        x = valid_ids[: n * args.seq_len].view(n, args.seq_len)
        losses = []
        for i in range(0, n, 8):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                losses.append(model(x[i: i + 8], labels=x[i: i + 8]).loss.float())
        model.train()
        return torch.stack(losses).mean().item()

    max_steps = args.max_steps
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "n_params": n_params, "curve": []}
    t_start = time.time()
    step = 0
    while True:
        if max_steps and step >= max_steps:
            break
        if not max_steps and step == 20:  # fix the schedule length from the measured step time
            per_step = (time.time() - t_start) / 20
            max_steps = max(100, int(args.time_budget_min * 60 / per_step * 0.9))
            print(f"{per_step:.2f}s/step -> {max_steps} steps", flush=True)
        total = max_steps or 10**9
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step >= args.warmup and max_steps:
            frac = (step - args.warmup) / max(1, total - args.warmup)
            lr = args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        row = {"step": step, "loss": loss.item(), "lr": lr, "elapsed_s": time.time() - t_start}
        if step % args.eval_every == 0 or step == max_steps:
            row["val_loss"] = val_loss()
            print(f"step {step}/{max_steps} loss {row['loss']:.3f} val {row['val_loss']:.3f} "
                  f"ppl {math.exp(row['val_loss']):.1f} lr {lr:.2e} {row['elapsed_s']:.0f}s", flush=True)
        log["curve"].append(row)
        if step % 500 == 0 or step == max_steps:
            save(model, args.out, log)
    save(model, args.out, log)
    print(f"done: {step} steps, {(time.time() - t_start) / 60:.1f} min", flush=True)


def save(model, out: Path, log: dict):
    """bf16 safetensors + config + the loss curve; written to a temp dir name then renamed per file."""
    import copy
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.torch_dtype = "bfloat16"
    m.save_pretrained(out, safe_serialization=True)
    tmp = out / "training_log.json.tmp"
    tmp.write_text(json.dumps(log))
    os.replace(tmp, out / "training_log.json")


if __name__ == "__main__":
    main()
