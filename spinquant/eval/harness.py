"""lm-eval-harness on the model in memory (fake-quant, rotated, QAT or packed): `lm_eval.simple_evaluate` through
an `HFLM` that wraps the live module, with the offline tasks shipped in `spinquant/eval/tasks/` (local files
from the data root) and, when `include_defaults`, lm-eval's own tasks (hellaswag, arc_easy, ...: these need
the hub or a warm HF datasets cache).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=4)
def task_manager(include_defaults: bool = False, data_root=None):
    """lm-eval's task index (built once per setting: with include_defaults it scans hundreds of task YAMLs, and a
    run checks its task names before loading the model, then evaluates the quantized and packed models)."""
    from lm_eval.tasks import TaskManager
    meta = {"data_root": str(data_root)} if data_root else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=meta)


def check_tasks(tasks: list[str], include_defaults: bool = False, data_root=None):
    """The TaskManager for `tasks`, or a ValueError naming the unknown ones (call it before hours of work)."""
    tm = task_manager(include_defaults, str(data_root) if data_root else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        known = LOCAL_TASKS + ([] if not include_defaults else ["... lm-eval's tasks (lm_eval --tasks list)"])
        hint = "" if include_defaults else " (lm-eval's own tasks need eval.lm_eval.include_defaults=true and the hub)"
        raise ValueError(f"unknown lm-eval task(s) {unknown}; known: {', '.join(known)}{hint}")
    return tm


def evaluate_tasks(model, tokenizer, tasks: list[str], *, max_length: int, batch_size: int = 1,
                   limit: int | float | None = None, num_fewshot: int | None = None, include_defaults: bool = False,
                   add_bos_token: bool | None = False, data_root=None, seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval.simple_evaluate on `model` as it is in memory; `max_length` is the
    model context lm-eval's windows use (rolling perplexity: tokens per window). Unknown task names are an
    error listing the known ones, before anything is evaluated.

    add_bos_token=False: BOS is only the first window's context (rolling perplexity then equals
    `spinquant.eval.perplexity.document_perplexity`); None: the tokenizer's default, lm-eval's own default,
    which for Llama tokenizers also scores a BOS at the start of every document."""
    if not tasks:
        return {}
    if not include_defaults:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    tm = check_tasks(tasks, include_defaults, data_root)
    class QuietHFLM(HFLM):  # lm-eval opens a progress bar per document inside its own bar over documents
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kw)

    lm = QuietHFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                   add_bos_token=add_bos_token, device=str(next(model.parameters()).device))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
    return results
