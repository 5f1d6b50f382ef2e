"""lm-eval-harness adapter: the shipped offline task, its agreement with the framework's own rolling-document
perplexity, the window protocol against lm-eval's, lm-eval in a results row, and bad task names."""
import math
import random
from pathlib import Path

import pytest
import torch

from spinquant.data import count_words, load_text, wikitext_detokenize, wikitext_documents
from spinquant.eval import document_perplexity, rolling_loglikelihood
from spinquant.eval.harness import evaluate_tasks
from spinquant.eval.perplexity import rolling_windows

ROOT = Path(__file__).resolve().parents[1]


def test_rolling_windows_are_lm_evals_windows():
    """Same inputs and scored tokens as lm-eval's rolling windows (get_rolling_token_windows with context_len=1,
    made disjoint as HFLM does), for random lengths including shorter than, equal to and one past a window."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    rng = random.Random(0)
    for n, L in [(1, 4), (4, 4), (5, 4), (9, 4), (37, 8), *[(rng.randint(1, 300), rng.randint(2, 64)) for _ in range(40)]]:
        toks = list(range(100, 100 + n))
        stream = [7] + toks
        ours = [(stream[s:e], stream[s + 1 + f:e + 1]) for s, e, f in rolling_windows(n, L)]
        theirs = [make_disjoint_window((list(a), list(b))) for a, b in get_rolling_token_windows(toks, 7, L, 1)]
        assert len(ours) == len(theirs)
        for (inp, tgt), (ctx, cont) in zip(ours, theirs):
            assert inp == (ctx + cont)[-(L + 1):][:-1] and tgt == cont  # lm-eval feeds (ctx + cont)[:-1], last L
        assert sum(len(t) for _, t in ours) == n  # every token scored exactly once


def test_rolling_loglikelihood_equals_a_naive_token_by_token_loop(tiny_llama):
    """The windowed sum equals scoring each token with the same context, one forward at a time (float64)."""
    model = tiny_llama.double()
    ids = torch.randint(0, 128, (23,)).tolist()
    L = 8
    ref = 0.0
    stream = [1] + ids
    for s, e, f in rolling_windows(len(ids), L):
        for j in range(f, e - s):  # token stream[s+j+1] given stream[s : s+j+1]
            x = torch.tensor([stream[s:s + j + 1]])
            ref += torch.log_softmax(model(x).logits[0, -1], -1)[stream[s + j + 1]].item()
    assert rolling_loglikelihood(model, ids, 1, L) == pytest.approx(ref, rel=1e-10)


def test_shipped_task_on_the_fp_reference_model_agrees_with_our_rolling_perplexity():
    """The acceptance check: lm-eval's spinquant_wikitext2 on the FP reference model (first 3 articles) equals
    the framework's document_perplexity under the same protocol."""
    from spinquant.models import load
    model, tok = load("ref-llama")
    res = evaluate_tasks(model, tok, ["spinquant_wikitext2"], max_length=256, batch_size=4, limit=3)["spinquant_wikitext2"]
    docs = wikitext_documents(load_text("wikitext2-raw"))[:3]
    ours = document_perplexity(model, tok, [wikitext_detokenize(d) for d in docs], 256, [count_words(d) for d in docs],
                               [len(d.encode()) for d in docs], progress=False)
    for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert res[k] == pytest.approx(ours[k], rel=1e-5), k
    assert res["bits_per_byte"] == pytest.approx(math.log2(res["byte_perplexity"]), rel=1e-9)
    assert 1 < res["byte_perplexity"] < 10


def test_wikitext_documents_are_the_62_test_articles():
    docs = wikitext_documents(load_text("wikitext2-raw"))
    assert len(docs) == 62 and docs[0].startswith(" = Robert Boulter = ")
    assert all(d.lstrip().startswith("= ") for d in docs)
    assert "".join(docs).split() == load_text("wikitext2-raw").split()  # nothing lost or duplicated
    assert wikitext_detokenize("a @-@ b , c ( d ) 1 @,@ 000 's") == "a-b, c (d) 1,000's"


def test_unknown_task_is_a_clear_error_before_any_work(stories):
    model, tok = stories
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['hellaswagg'\].*spinquant_wikitext2"):
        evaluate_tasks(model, tok, ["hellaswagg"], max_length=64)
    from spinquant.data import DataError
    with pytest.raises(DataError, match="no data root found"):  # the offline task reads the configured data root
        evaluate_tasks(model, tok, ["spinquant_wikitext2"], max_length=64, limit=1, data_root="/nonexistent/spinquant")


def test_lm_eval_metrics_join_the_row_for_fake_quant_and_packed_models(tmp_path):
    from hydra import compose, initialize_config_dir

    from spinquant import cli as run_mod
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=stories260k", "quant=w4a16", f"results_dir={tmp_path}", "experiment_name=le", "progress=false",
            "eval.datasets=[wikitext2]", "eval.max_windows=2", "eval.seq_len=128", "wandb.mode=disabled",
            "eval.lm_eval.tasks=[spinquant_wikitext2]", "eval.lm_eval.limit=2", "kernels=cpu", "eval.size=false"])
        bad = compose("config", overrides=["model=stories260k", f"results_dir={tmp_path}", "eval.lm_eval.tasks=[nope]"])
    row = run_mod.run_hydra(cfg)
    fq, packed = row["metrics"]["lm_eval"]["spinquant_wikitext2"], row["metrics"]["packed"]["lm_eval"]["spinquant_wikitext2"]
    assert set(fq) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert packed["word_perplexity"] == pytest.approx(fq["word_perplexity"], rel=2e-2)  # bf16 packed vs fp32 fake-quant
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_mod.run_hydra(bad)  # before loading the model
