"""The library surface: the README's Python API, typed configs (unknown keys refused), the `spinquant` command
(help, resolved presets, tables, export) and the installed wheel outside the checkout."""
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

import spinquant as sq
from spinquant import cli
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- BEGIN python_api -->\n```python\n", 1)[1].split("```\n<!-- END python_api -->", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md python_api", "exec"), {})
    ppl = float(re.search(r"'wikitext2': ([0-9.]+)", capsys.readouterr().out).group(1))
    assert 150 < ppl < 400  # ref-llama's FP is ~183 on the full set; W4A8 with FP layer 0 on 2 windows
    model, tok = sq.load_packed(tmp_path / "out/ref-llama-w4a8")
    assert model.spinquant.rotation.name == "quarot" and model.spinquant.rotation.config["seed"] == 0
    assert model.spinquant.quant.overrides[0].modules == "*.down_proj"
    packed = {n: isinstance(m, sq.kernels.PackedLinear) for n, m in model.named_modules() if n.endswith("_proj")}
    assert not packed["model.layers.0.mlp.down_proj"] and packed["model.layers.1.mlp.down_proj"]


def test_top_level_exports_and_version():
    assert re.match(r"\d+\.\d+", sq.__version__)
    for name in ("load_model", "rotate", "quantize_", "evaluate", "pack", "save", "load_packed", "run", "RunConfig",
                 "QuantConfig", "QuaRotConfig", "SpinQuantConfig", "register_rotation", "register_weight_quantizer"):
        assert hasattr(sq, name), name


@pytest.mark.parametrize("section,bad,match", [
    ("rotation", {"name": "quarot", "sed": 1}, r"unknown rotation\.sed for rotation 'quarot'"),
    ("rotation", {"name": "spinquant", "step": 10}, r"unknown rotation\.step"),
    ("eval", {"max_window": 2}, r"eval\.max_window"),
    ("model", {"name": "x", "pth": "y"}, r"model\.pth"),
    ("qat", {"name": "lora", "train": {"step": 3}}, r"qat\.train\.step"),
    ("qat", {"name": "lora", "lora": {"rnak": 3}}, r"qat\.lora\.rnak"),
    ("kernels", {"name": "cuda"}, "unknown kernels 'cuda'"),
])
def test_misspelled_config_keys_are_refused(section, bad, match):
    with pytest.raises(ValueError, match=match):
        sq.RunConfig.from_dict({section: bad})


def test_misspelled_key_through_hydra_plus_plus_is_refused(tmp_path):
    cfg = cli.compose("model=stories260k", f"results_dir={tmp_path}", "++rotation.sed=3", "rotation=quarot")
    with pytest.raises(ValueError, match=r"unknown rotation\.sed"):
        cli.run_hydra(cfg, choices={})
    cfg = cli.compose("model=stories260k", f"results_dir={tmp_path}", "++eval.max_window=2")
    with pytest.raises(ValueError, match=r"eval\.max_window"):
        cli.run_hydra(cfg, choices={})
    assert not (tmp_path / "default").exists()


def test_registered_rotation_runs_from_its_typed_config():
    from dataclasses import dataclass
    calls = []

    @dataclass
    class Scale:
        name: str = "identity_check"
        factor: float = 1.0

    sq.register_rotation("identity_check", Scale, lambda model, cfg, calib=None, target=None: calls.append(cfg))
    try:
        from tests.conftest import make_tiny
        model = make_tiny()
        sq.rotate(model, {"name": "identity_check", "factor": 2.0})
        assert calls == [{"name": "identity_check", "factor": 2.0}] and model.spinquant.rotation.name == "identity_check"
        with pytest.raises(ValueError, match=r"unknown rotation\.factr"):
            sq.rotate(model, {"name": "identity_check", "factr": 2.0})
    finally:
        from spinquant.rotation import ROTATIONS
        ROTATIONS.pop("identity_check")


def test_help_lists_schemes_quantizers_rotations_and_families(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for want in ("W4A8 ", "int4 sym g32", "gptq", "rtn", "quarot", "spinquant", "llama", "qwen2", "mistral",
                 "w4a8_mixed", "+experiment"):
        assert want in out, want
    cli.main(["run", "--help"])
    assert "W4A4KV4" in capsys.readouterr().out


def test_cfg_job_shows_the_resolved_preset(capsys):
    cli.main(["run", "--cfg", "job", "quant=w4a8_mixed"])
    out = capsys.readouterr().out
    from omegaconf import OmegaConf
    quant = OmegaConf.create(out.split("\n", 1)[1]).quant
    assert quant.weight.bits == 4 and quant.weight.group_size == 32 and quant.act.bits == 8 and quant.act.granularity == "token"
    assert quant.overrides[0].weight.bits == 8


def test_row_records_the_resolved_quant_config(tmp_path):
    row = cli.run_hydra(cli.compose("model=stories260k", "quant=w4a8_mixed", "quant.group_fallback=channel",
                                    f"results_dir={tmp_path}", "eval.datasets=[wikitext2]", "eval.max_windows=1",
                                    "eval.seq_len=128", "wandb.mode=disabled", "progress=false"), choices={})
    assert row["scheme"] == "W4A8-mixed" and row["quant"]["weight"]["group_size"] == 32
    assert row["quant"]["overrides"][0]["weight"]["bits"] == 8 and row["config"]["quant"]["weight"] == {}


def test_tables_name_columns_by_dataset_and_mark_window_subsets(tmp_path, capsys):
    text = tmp_path / "my_corpus.txt"
    text.write_text((ROOT / "README.md").read_text())
    for q in ("w16a16", "w4a8"):
        cli.run_hydra(cli.compose("model=stories260k", f"quant={q}", "quant.group_fallback=channel",
                                  f"results_dir={tmp_path}/res", f"eval.datasets=[{text}]", "eval.max_windows=2",
                                  "eval.seq_len=128", "wandb.mode=disabled", "progress=false"), choices={})
    capsys.readouterr()
    cli.main(["tables", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert "PPL my_corpus |" in out and str(tmp_path) not in out
    assert re.search(r"\| W4A8 \| rtn \|[^|]*\| [0-9.]+† \|", out)
    assert "† evaluated on only the first 2 windows" in out


def test_export_command_writes_a_packed_model_that_reloads(tmp_path):
    cli.main(["export", str(tmp_path / "m"), "model=stories260k", "quant=w4a8", "quant.group_fallback=channel",
              "progress=false"])
    model, tok = sq.load_packed(tmp_path / "m")
    assert tok is not None and model.spinquant.quant.label() == "W4A8"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(SystemExit, match="usage: spinquant export OUT"):
        cli.main(["export", "quant=w4a8"])


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """Build the wheel, install it into a fresh venv outside the repository (dependencies reached through the
    test environment's site-packages, not its spinquant), and run `spinquant --help` and the default experiment."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(dist), str(ROOT)], check=True, env=ENV, capture_output=True)
    wheel = next(dist.glob("spinquant-*.whl"))
    import zipfile
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert "spinquant/qat/loop.py" in zipfile.ZipFile(wheel).namelist()
    assert "qat" not in tops, tops  # QAT lives in spinquant.qat: the wheel claims no global `qat` import name
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next(env_dir.glob("lib/python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")  # plain paths: their .pth files (our editable) are not run
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, env=ENV, capture_output=True)
    from spinquant.data import data_root
    env = {**ENV, "SPINQUANT_DATA": str(data_root())}  # the data as this checkout finds it; the model ships in the wheel
    py, exe = env_dir / "bin" / "python", site / "bin" / "spinquant"
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import spinquant, sys; print(spinquant.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout's
    run = [str(py), "-c", "import sys; from spinquant.cli import main; main(sys.argv[1:])"]
    if exe.exists():
        run = [str(py), str(exe)]
    out = subprocess.run([*run, "--help"], cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert "W4A4KV4" in out and "quarot" in out and str(site) in out  # configs shipped inside the package
    res = subprocess.run([*run, "run", "eval.datasets=[wikitext2]", "eval.max_windows=2", "progress=false",
                          "wandb.mode=disabled", "quant=w4a8"], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list((work / "results" / "default").glob("*.json"))
    assert len(rows) == 1
    row = json.loads(rows[0].read_text())
    assert row["model"] == "ref-llama" and row["scheme"] == "W4A8" and row["metrics"]["ppl_detail"]["wikitext2"]["windows"] == 2


def test_run_from_a_config_built_in_python(tmp_path):
    cfg = sq.RunConfig(model=sq.ModelConfig(name="stories260k", path="stories260k", seq_len=128),
                       quant=sq.QuantConfig(scheme="W4A8", group_fallback="channel"),
                       rotation=sq.QuaRotConfig(fallback="block_diagonal"),
                       eval=sq.EvalConfig(datasets=["wikitext2"], max_windows=1, size=False, memory=False),
                       results_dir=str(tmp_path), progress=False)
    row = sq.run(cfg)
    assert row["scheme"] == "W4A8" and row["method"] == {"rotation": "quarot", "weights": "rtn", "qat": "none"}
    assert row["config"]["rotation"]["fallback"] == "block_diagonal" and row["metrics"]["ppl"]["wikitext2"] > 1
    assert sq.run(cfg)["run_id"] == row["run_id"] and len(list((tmp_path / "default").glob("*.json"))) == 1


def test_importing_spinquant_prints_no_start_up_noise():
    """transformers imports torchao when it is installed; on a CPU-only machine torchao's CUDA-extension warnings and
    torch's pytree notice about torchao's Enums would print on every start (`spinquant --help` included)."""
    import subprocess
    import sys
    require("torchao")
    r = subprocess.run([sys.executable, "-c", "import spinquant, transformers, torchao; import spinquant.kernels"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Enum subclass" not in r.stderr and "Failed to load" not in r.stderr, r.stderr


def test_a_missing_runtime_fails_under_ci_and_skips_elsewhere(monkeypatch):
    from tests.conftest import skip_outside_ci
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_runtime_xyz is not importable under CI"):
        require("no_such_runtime_xyz")
    with pytest.raises(pytest.fail.Exception, match="no qemu"):
        skip_outside_ci("no qemu")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require("no_such_runtime_xyz")
    assert require("json").dumps([]) == "[]"


def test_no_private_name_is_imported_across_packages():
    """Each subpackage of spinquant (quant, rotation, qat, kernels, ...) and each top-level module uses the others
    through public names only (no `_private` helper), so one room can change its internals without breaking another.
    The package's __init__ may import its own private modules (`_quiet`)."""
    import ast
    root = ROOT / "spinquant"
    bad = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        unit = rel[0] if len(rel) > 1 else rel[0][:-3]  # a subpackage, or a top-level module
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if not private or f == root / "__init__.py":
                continue
            if node.level == 0:
                target = (node.module or "").split(".")
                target = target[1] if target[0] == "spinquant" and len(target) > 1 else "<external>"
            else:
                here = list(rel[:-1])[:len(rel) - node.level] if node.level > 1 else list(rel[:-1])
                target = (here + (node.module or "").split("."))[0]
            if target != unit:
                bad.append(f"{'/'.join(rel)}: {'.' * node.level}{node.module} import {', '.join(private)}")
    for f in sorted((ROOT / "examples").rglob("*.py")):  # plugins show users the public API
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spinquant"):
                bad += [f"examples/{f.name}: {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    # the one private name of another library, pinned (executorch<1.6 in pyproject and the lock) and exercised by the
    # ExecuTorch deploy tests: XNNPACK's thread pool has no public setter
    allowed = {"deploy.py: executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool"}
    assert set(bad) == allowed, sorted(set(bad) - allowed)
    import spinquant.qat as qat
    from spinquant import pipeline
    assert pipeline.qat is qat and {"full", "lora"} <= set(qat.METHODS)


def test_python_and_hydra_give_a_section_the_same_seed_progress_and_length(tmp_path):
    """One rule in RunConfig for what the run's seed, progress and model.seq_len set in a section that leaves them
    unset: a config built in Python resolves the rotation and QAT sections as Hydra's interpolations do, and the
    same run made both ways writes the same row (same run id, same perplexity)."""
    from omegaconf import OmegaConf

    from spinquant import cli
    common = ["model=stories260k", "model.seq_len=128", "seed=1", "progress=false", "quant.group_fallback=channel",
              "eval.datasets=[wikitext2]", "eval.max_windows=2", "eval.size=false", "eval.memory=false",
              "eval.kld=false", "wandb.mode=disabled"]

    def hydra(*extra):
        return sq.RunConfig.from_dict(OmegaConf.to_container(cli.compose(*common, *extra), resolve=True))

    def python(**kw):
        return sq.RunConfig(model=sq.ModelConfig(name="stories260k", path="stories260k", seq_len=128), seed=1,
                            progress=False, quant=sq.QuantConfig(scheme="W4A8", group_fallback="channel"),
                            eval=sq.EvalConfig(datasets=["wikitext2"], max_windows=2, size=False, memory=False,
                                               kld=False), wandb={"mode": "disabled"}, **kw)
    h, p = hydra("rotation=spinquant", "qat=lora"), python(rotation=sq.SpinQuantConfig(), qat={"name": "lora"})
    for key in ("seed", "progress", "seq_len"):
        assert getattr(p.rotation, key) == getattr(h.rotation, key), key
        assert p.qat.train[key] == h.qat.train[key], key
    assert (p.rotation.seed, p.rotation.seq_len, p.qat.train["seq_len"]) == (1, 128, 128)
    h, p = hydra("quant=w4a8", "rotation=quarot", f"results_dir={tmp_path / 'h'}"), \
        python(rotation=sq.QuaRotConfig(), results_dir=str(tmp_path / "p"))
    rh, rp = sq.run(h), sq.run(p)
    assert rp["metrics"]["ppl"] == rh["metrics"]["ppl"] and rp["config"]["rotation"] == rh["config"]["rotation"]
