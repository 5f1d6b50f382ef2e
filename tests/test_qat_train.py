"""The QAT loop: a kill-and-resume run equals an uninterrupted one; 2 CPU processes equal 1 process with
the same global batch; distillation and bad batch sizes."""
import ctypes

import pytest
import torch
from conftest import make_tiny, run_distributed

from spinquant.qat.fake_quant import QATConfig, prepare
from spinquant.qat.loop import TrainConfig, train
from spinquant.quant import QuantConfig

TOKENS = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(0))


def _model(mode="lora"):
    return prepare(make_tiny("llama", hidden=64, intermediate=128), QuantConfig.from_dict({"scheme": "W4A8"}),
                   QATConfig(mode=mode, lora_rank=4, scales="learnable"))


def _cfg(**kw):
    base = dict(steps=4, batch_size=4, micro_batch_size=2, seq_len=32, lr=1e-2, warmup=1, progress=False,
                wandb_mode="disabled", mixed_precision="no")
    return TrainConfig(**{**base, **kw})


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or ".lora." in n
            or n.endswith(".scale")}


def test_resume_after_a_kill_gives_the_same_weights(tmp_path, monkeypatch):
    import spinquant.qat.loop as qt
    full, st_full = train(_model(), TOKENS, _cfg(out_dir=str(tmp_path / "a")))
    assert st_full["resumed_from"] == 0 and st_full["prior_train_s"] == 0.0
    real = qt.batch_for_step

    def killed_at_step_3(tokens, step, cfg):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return real(tokens, step, cfg)

    monkeypatch.setattr(qt, "batch_for_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):  # dies after the checkpoint at step 2, during step 3
        train(_model(), TOKENS, _cfg(checkpoint_every=2, out_dir=str(tmp_path / "b")))
    monkeypatch.setattr(qt, "batch_for_step", real)
    resumed, st = train(_model(), TOKENS, _cfg(checkpoint_every=2, out_dir=str(tmp_path / "b")))
    assert st["resumed_from"] == 2 and len(st["losses"]) == 4
    # the training time covers all 4 steps: the killed process's 2 checkpointed steps plus this one's 2
    assert 0 < st["prior_train_s"] < st["train_s"]
    assert st["tokens_per_s"] == pytest.approx(st["train_tokens"] / st["train_s"])
    a, b = _trainable(full), _trainable(resumed)
    fresh = _trainable(_model())
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], fresh[k]) for k in a)


def _train_in_rank(out, mode):
    import os
    model, st = train(_model(mode), TOKENS, _cfg())
    torch.save({**_trainable(model), "processes": st["processes"]}, f"{out}/rank{os.environ['RANK']}.pt")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_cpu_processes_equal_one_process_with_the_same_global_batch(tmp_path, mode):
    run_distributed(_train_in_rank, str(tmp_path), mode)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.pop("processes") == 2 and r1.pop("processes") == 2  # really data-parallel
    one, _ = train(_model(mode), TOKENS, _cfg())
    ref = _trainable(one)
    before = _trainable(_model(mode))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(torch.allclose(r0[k], ref[k], atol=1e-5, rtol=1e-4) for k in ref)
    assert any(not torch.allclose(before[k], ref[k]) for k in ref)


def test_distillation_and_bad_batch_sizes():
    teacher = make_tiny("llama", hidden=64, intermediate=128)
    _, st = train(_model(), TOKENS, _cfg(steps=2, kd_weight=0.5), teacher=teacher)
    assert len(st["losses"]) == 2 and st["trainable_params"] > 0
    with pytest.raises(ValueError, match="batch_size 5 must be a multiple"):
        train(_model(), TOKENS, _cfg(batch_size=5))


def test_offline_wandb_run_holds_the_logged_metrics(tmp_path):
    """The default (offline) wandb mode works with the installed wandb, and the run folder holds every step's
    loss and the training stats the results row gets."""
    from spinquant.tracking import read_offline_run
    _, st = train(_model(), TOKENS, _cfg(steps=3, wandb_mode="offline", out_dir=str(tmp_path)))
    history, summary = read_offline_run(tmp_path)
    assert [h["train/loss"] for h in history] == pytest.approx(st["losses"])
    for k in ("train_tokens", "trainable_params", "tokens_per_s", "loss_last"):
        assert summary[f"qat_train/{k}"] == pytest.approx(st[k])


def test_peak_memory_is_the_peak_during_training_not_the_memory_at_the_end():
    """A forward that briefly holds 400 MB: the recorded peak includes it, although the process is far below it
    when training ends (the old figure was the RSS at the end)."""
    import psutil
    model = _model()
    held = []

    def spike(module, inp, out):
        held.append(torch.ones(100_000_000))  # 400 MB, touched
        held.clear()
    model.model.layers[0].register_forward_hook(spike)
    before = psutil.Process().memory_info().rss
    _, st = train(model, TOKENS, _cfg(steps=2))
    try:  # freed memory back to the OS (glibc keeps freed heap in a long test process): the RSS now is the floor
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    after = psutil.Process().memory_info().rss
    assert st["peak_mem_bytes"] >= before + 350e6
    assert st["peak_mem_bytes"] >= after + 300e6  # the end-of-training RSS would miss the spike
    assert st["peak_mem_delta_bytes"] >= 350e6
