"""Perplexity against a naive float64 loop; size accounting; data errors; memory measurement."""
import math

import pytest
import torch

from spinquant.data import DataError, dataset_path, load_text, tokenize
from spinquant.eval import PeakMemory, perplexity_of_ids, size_bits, size_on_disk
from spinquant.kernels.packing import pack_bits, unpack_bits
from spinquant.quant import QuantConfig, QuantSpec, quantize_
from tests.conftest import make_tiny


def naive_ppl(model, ids, seq_len, stride):
    """Score each token once: token t is predicted by the window that ends earliest while containing t-1."""
    ids = ids.reshape(-1)
    n = ids.numel()
    scored = set()
    nll, count = 0.0, 0
    starts = range(0, n - seq_len + 1, seq_len) if stride == seq_len else range(0, n - 1, stride)
    for s in starts:
        e = min(s + seq_len, n)
        with torch.no_grad():
            logits = model(ids[s:e].unsqueeze(0)).logits[0].double()
        for j in range(s + 1, e):
            if j in scored:
                continue
            scored.add(j)
            nll -= torch.log_softmax(logits[j - s - 1], -1)[ids[j]].item()
            count += 1
        if e == n:
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 8), (20, 5)])
def test_perplexity_matches_naive_loop(seq_len, stride):
    torch.manual_seed(0)
    model = make_tiny("llama", vocab=64)
    ids = torch.randint(0, 64, (1, 101))
    ppl, count = naive_ppl(model, ids, seq_len, stride)
    r = perplexity_of_ids(model, ids, seq_len, stride, batch_size=3, progress=False)
    assert r.tokens_scored == count
    assert r.ppl == pytest.approx(ppl, rel=1e-5)
    if stride < seq_len:
        assert count == 100  # every token but the first is scored exactly once


def test_missing_data_file_and_unknown_dataset(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    with pytest.raises(DataError, match="missing data file for 'wikitext2'.*wiki.test.joined.txt.*SPINQUANT_DATA"):
        dataset_path("wikitext2", root=tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'c4'"):
        dataset_path("c4", root=tmp_path)


def test_no_data_root_is_a_clear_error(monkeypatch, tmp_path):
    from spinquant.data import data_root
    monkeypatch.setenv("SPINQUANT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no data root found.*SPINQUANT_DATA"):
        data_root()


def test_empty_text_is_a_clear_error(tmp_path, stories):
    _, tok = stories
    f = tmp_path / "empty.txt"
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(f))
    with pytest.raises(ValueError, match="empty"):
        tokenize(tok, "   ")


def test_text_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity_of_ids(make_tiny("llama"), torch.randint(0, 128, (1, 10)), seq_len=32, progress=False)


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_roundtrip(bits):
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (37, 11))
    packed = pack_bits(codes, bits, offset=2 ** (bits - 1))
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel(), offset=2 ** (bits - 1)).reshape(37, 11),
                       codes.to(torch.int32))


def test_size_counts_bits_scales_and_zeros():
    fp = make_tiny("llama", hidden=64, intermediate=128, layers=2)
    n_all = sum(p.numel() for p in fp.parameters())
    assert size_bits(fp)["total_bits"] == 16 * n_all
    cfg = QuantConfig(weight=QuantSpec(bits=4, granularity="group", group_size=32, symmetric=False))
    q = quantize_(make_tiny("llama", hidden=64, intermediate=128, layers=2), cfg, progress=False)
    lin = [m for m in q.modules() if hasattr(m, "qweight") and m.qweight is not None]
    n_q = sum(m.weight.numel() for m in lin)
    n_groups = n_q // 32
    expected = 4 * n_q + n_groups * (16 + 4) + 16 * (n_all - n_q)
    assert size_bits(q)["total_bits"] == expected
    disk = size_on_disk(q)
    assert expected / 8 <= disk < expected / 8 + 20_000  # plus the safetensors header


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu", interval=0.001) as m:
        x = torch.ones(64 * 1024 * 1024 // 4 * 4)  # 256 MB
        x += 1
        del x
    assert m.peak_delta_bytes > 150e6


def test_activation_statistics_against_scipy_and_planted_outlier():
    from scipy.stats import kurtosis

    from spinquant.eval.activations import activation_stats, summarize
    x = torch.randn(500, 32)
    x[:, 7] *= 40  # a planted outlier channel
    s = summarize(x)
    assert s["kurtosis"] == pytest.approx(kurtosis(x.reshape(-1).numpy().astype("float64"), fisher=False), rel=1e-6)
    assert s["top_channels"][0] == 7 and s["channel_max_ratio"] > 10
    stats = activation_stats(make_tiny("llama", layers=2), torch.randint(0, 128, (4, 16)))
    assert [(r["layer"], r["input"]) for r in stats][:4] == [(0, "down"), (0, "gate_up"), (0, "o"), (0, "qkv")]
    assert len(stats) == 8


def test_window_nll_are_the_per_window_sums_of_a_naive_loop():
    torch.manual_seed(0)
    model = make_tiny("llama", vocab=64)
    ids = torch.randint(0, 64, (1, 70))
    r = perplexity_of_ids(model, ids, 16, batch_size=3, progress=False)
    want = []
    for s in range(0, 70 - 16 + 1, 16):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, s:s + 16]).logits[0].double(), -1)
        want.append(-sum(logp[j, ids[0, s + j + 1]].item() for j in range(15)))
    assert r.window_tokens == [15] * 4 and r.nll_sum == pytest.approx(math.fsum(r.window_nll), rel=1e-15)
    assert r.window_nll == pytest.approx(want, rel=1e-5)


def test_paired_standard_error_equals_a_numpy_transcription():
    import numpy as np

    from spinquant.eval.paired import paired_diff
    rng = np.random.default_rng(0)
    for n in (2, 7, 300):
        base = rng.uniform(3000, 4000, n)
        other = base + rng.normal(5, 20, n)
        tok = [511] * n
        a = {"window_nll": other.tolist(), "window_tokens": tok, "seq_len": 512, "stride": 512, "windows": n}
        b = {"window_nll": base.tolist(), "window_tokens": tok, "seq_len": 512, "stride": 512, "windows": n}
        d = paired_diff(a, b)
        diff = other - base
        T = 511 * n
        se = np.sqrt(n) * np.std(diff, ddof=1) / T
        assert d.delta_nll == pytest.approx(diff.sum() / T, rel=1e-12)
        assert d.se_nll == pytest.approx(se, rel=1e-10)
        assert d.delta_ppl == pytest.approx(np.exp(other.sum() / T) - np.exp(base.sum() / T), rel=1e-9)
        assert d.se_ppl == pytest.approx(np.exp(other.sum() / T) * se, rel=1e-9)
        assert d.within_noise == (abs(diff.sum() / T) <= 2 * se)
    with pytest.raises(ValueError, match="same windows"):
        paired_diff(a, {**b, "window_tokens": [511] * (n - 1) + [100]})
    with pytest.raises(ValueError, match="window_nll"):
        paired_diff(a, {**b, "window_nll": []})


def _naive_kld(ref: torch.Tensor, q: torch.Tensor) -> tuple[list[float], list[bool]]:
    """KL(softmax(ref) ‖ softmax(q)) per row, a float64 loop over the vocabulary (the definition)."""
    out, same = [], []
    for r, s in zip(ref.double().tolist(), q.double().tolist()):
        zr, zs = math.fsum(math.exp(v) for v in r), math.fsum(math.exp(v) for v in s)
        out.append(math.fsum(math.exp(a) / zr * (math.log(math.exp(a) / zr) - math.log(math.exp(b) / zs))
                             for a, b in zip(r, s)))
        same.append(max(range(len(r)), key=r.__getitem__) == max(range(len(s)), key=s.__getitem__))
    return out, same


def test_token_kld_matches_a_float64_loop_on_random_logits():
    from spinquant.eval.perplexity import KLD_CHUNK, token_kld
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    n = KLD_CHUNK + 13  # more than one chunk
    ref = torch.randn(n, 57, generator=g) * 3
    q = ref + 0.3 * torch.randn(n, 57, generator=g)
    want, same = _naive_kld(ref, q)
    got, agree = token_kld(ref, q)
    assert got.dtype == torch.float64 and torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9,
                                                         atol=1e-12)
    assert agree.tolist() == same and 0 < sum(same) < n
    assert token_kld(ref, ref)[0].abs().max() == 0


def test_kld_of_a_quantized_model_on_the_perplexity_windows():
    """mean / p99 / max / top-1 and per-window sums from the float64 loop, on exactly the windows perplexity scores."""
    fp = make_tiny("llama", seed=3)
    q = make_tiny("llama", seed=3)
    quantize_(q, QuantConfig(scheme="W4A8"), progress=False)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    r = perplexity_of_ids(q, ids, 64, stride=48, batch_size=2, progress=False, reference=fp)
    want_win, want_same, toks = [], [], []
    with torch.no_grad():
        for s, e, first in [(0, 64, 1), (48, 112, 16), (96, 160, 16), (144, 200, 16)]:
            x = ids[:, s:e]
            k, same = _naive_kld(fp(x).logits[0, first - 1:-1], q(x).logits[0, first - 1:-1])
            want_win.append(math.fsum(k))
            want_same.append(sum(same))
            toks += k
    kld = r.kld
    assert kld.tokens == r.tokens_scored == len(toks)
    assert kld.window_kld == pytest.approx(want_win, rel=1e-6) and kld.window_top1 == want_same
    assert kld.mean == pytest.approx(math.fsum(toks) / len(toks), rel=1e-6)
    assert kld.max == pytest.approx(max(toks), rel=1e-6) and kld.top1 == sum(want_same) / len(toks)
    import numpy as np
    assert kld.p99 == pytest.approx(float(np.quantile(np.array(toks), 0.99)), rel=1e-6)
    assert perplexity_of_ids(fp, ids, 64, progress=False, reference=fp).kld.mean == 0.0  # FP against itself


def test_cached_reference_logits_give_the_same_kld_and_run_the_model_once_per_window(tmp_path):
    """KLD against CachedLogits(fp) equals KLD against fp itself (bit for bit: float32 logits stored as they are),
    and a second file scored on the same windows reads the FP logits back instead of running the model."""
    from spinquant.eval.perplexity import perplexity_of_ids
    from spinquant.eval.reference import CachedLogits
    fp, q1, q2 = (make_tiny("llama", seed=4) for _ in range(3))
    quantize_(q1, QuantConfig(scheme="W4A8"), progress=False)
    quantize_(q2, QuantConfig(scheme="W8A8"), progress=False)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    calls = []
    counted = CachedLogits(lambda x: calls.append(x.shape[0]) or fp(x, use_cache=False).logits, tmp_path / "ref")
    for q in (q1, q2):
        want = perplexity_of_ids(q, ids, 64, batch_size=2, progress=False, reference=fp).kld
        got = perplexity_of_ids(q, ids, 64, batch_size=2, progress=False, reference=counted).kld
        assert got.window_kld == want.window_kld and got.mean == want.mean and got.top1 == want.top1
    assert sum(calls) == 3 and counted.computed == 3 and counted.read == 3   # 3 windows of 64 in 200 tokens
    assert len(list((tmp_path / "ref").glob("*.npy"))) == 3 and not list((tmp_path / "ref").glob(".*"))
