"""Which jobs of a Hydra sweep are rows of a table: `sweep.skip` rules in an experiment file.

A table is rarely a full cartesian product (QAT needs no GPTQ variant; the FP row needs no rotation), so an
experiment sweeps the product and lists the combinations that are not rows:

    sweep:
      skip:
        - {quant: w16a16, rotation: [quarot, spinquant]}   # every key must match; lists and globs allowed
        - {quant: "*_gptq", qat: [full, lora]}

Keys are config-group names (matched against the group option chosen, e.g. `quant: w4a8_gptq`) or dotted
config keys (matched against the value, e.g. `model.name: ref-llama`).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

from omegaconf import OmegaConf


def _matches(value, pattern) -> bool:
    patterns = pattern if isinstance(pattern, (list, tuple)) else [pattern]
    return any(fnmatchcase(str(value), str(p)) for p in patterns)


def skip_rule(cfg, choices: dict[str, str] | None, rules) -> dict | None:
    """The first rule in `rules` that this job (its group `choices` and config `cfg`) matches, else None."""
    for rule in rules or []:
        rule = OmegaConf.to_container(rule) if OmegaConf.is_config(rule) else rule
        if not isinstance(rule, dict) or not rule:
            raise ValueError(f"sweep.skip entries must be non-empty mappings of group/key -> option(s), got {rule!r}")
        ok = True
        for key, pattern in rule.items():
            if choices is not None and key in choices:
                value = choices[key]
            else:
                value = OmegaConf.select(cfg, key, default=KeyError)
                if value is KeyError:
                    raise ValueError(f"sweep.skip rule {rule} names {key!r}: neither a config group nor a config key")
            ok = ok and _matches(value, pattern)
        if ok:
            return rule
    return None


def hydra_choices() -> dict[str, str] | None:
    """Group options of the running Hydra job (None outside @hydra.main, e.g. under the compose API)."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return None
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None and not k.startswith("hydra")}


def sweep_jobs(config_dir, experiment: str, *overrides: str) -> tuple[list[tuple[dict, object]], int]:
    """Every job `run.py -m +experiment=<experiment> [overrides]` would run, as (choices, composed config), and the
    number its `sweep.skip` rules drop. Composes configs only: nothing is loaded or run."""
    import itertools

    from hydra import compose, initialize_config_dir

    def _compose(ov, hydra=False):
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose("config", overrides=ov, return_hydra_config=hydra)

    # as Hydra's basic sweeper: the experiment's sweeper params, then the command line's overrides, which replace a
    # param of the same key (fixing it, or sweeping it where the value is a comma list)
    fixed, swept = [], {}
    for ov in overrides:
        key, value = split_override(ov)
        if is_sweep(value):
            swept[key] = value.split(",")
        else:
            fixed.append(ov)
    # the sweeper params alone (a fixed override such as rotation.lr may only compose once a swept group is chosen)
    base = _compose([f"+experiment={experiment}", *(ov for ov in fixed if ov.startswith("hydra."))], hydra=True)
    given = {split_override(ov)[0] for ov in fixed}
    params = {k: str(v).split(",") for k, v in base.hydra.sweeper.params.items() if k not in given}
    params |= swept
    jobs, skipped = [], 0
    for combo in itertools.product(*params.values()):
        choices = dict(zip(params, combo))
        cfg = _compose([f"+experiment={experiment}", *fixed, *(f"{k}={v}" for k, v in choices.items())])
        if skip_rule(cfg, choices, cfg.sweep.skip):
            skipped += 1
        else:
            jobs.append((choices, cfg))
    return jobs, skipped


def split_override(override: str) -> tuple[str, str]:
    """`+key=value` / `++key=value` / `key=value` / `~key[=value]` -> (key, value)."""
    key, sep, value = override.partition("=")
    if not sep and not override.startswith("~"):
        raise ValueError(f"not a key=value override: {override!r}")
    return key.lstrip("+~"), value


def is_sweep(value: str) -> bool:
    """A command-line sweep (`a,b,c`), not a list (`[a,b]`), dict or quoted string; sweep functions are refused."""
    v = value.strip()
    if v.startswith(("choice(", "range(", "interval(", "glob(")):
        raise ValueError(f"sweep functions are not expanded here, list the values instead (a,b,c): {value!r}")
    return "," in v and not v.startswith(("[", "{", "'", '"'))
