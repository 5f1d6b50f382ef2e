"""Every `spinquant …` / `experiments/run.py` command line in the README runs here, as written, with tiny windows
appended (one evaluation window of 64 tokens, 2 calibration samples, one training step), so that an example cannot
drift from the CLI. A line whose comment says `illustrative` (it needs a GPU, your own checkpoint, Slurm, the hub, or
runs a whole committed table) is composed with Hydra and built into a typed `RunConfig` instead: its overrides and
keys are still checked."""
import re
import shlex
from pathlib import Path

from spinquant import cli

ROOT = Path(__file__).resolve().parents[1]
STARTS = ("spinquant ", "python experiments/run.py ", "accelerate launch ", "torchrun ")


def readme_commands() -> list[tuple[str, bool]]:
    """(command without its comment, illustrative?) of every such line in the README's bash blocks, in order."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = block.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            if line.strip().startswith(STARTS):
                words = shlex.split(line, comments=True)
                out.append((shlex.join(words), "#" in line and "illustrative" in line.split("#", 1)[1]))
    return out


def _overrides(words: list[str]) -> list[str]:
    """The Hydra overrides of a command (after `run` / `sweep` / `experiments/run.py`), without launcher flags."""
    if words[0] == "spinquant":
        words = words[2:]
    else:
        words = words[words.index(next(w for w in words if w.endswith("experiments/run.py"))) + 1:]
    return [w for w in words if w != "-m" and not w.startswith("hydra.run.dir")]


def _tiny(overrides: list[str]) -> list[str]:
    """Overrides that make the command cheap, for the groups its config has."""
    cfg = cli.compose(*[o for o in overrides if not o.startswith("hydra/launcher")])
    tiny = ["eval.max_windows=1", "model.seq_len=64", "data.calib_samples=2", "wandb.mode=disabled", "progress=false",
            "eval.lm_eval.limit=2"]
    if not any(o.startswith("eval.datasets") for o in overrides) and not cfg.eval.lm_eval.tasks:
        tiny.append("eval.datasets=[wikitext2]")
    if cfg.rotation.name == "spinquant":
        tiny += ["rotation.steps=1", "rotation.samples=4", "rotation.heldout=2", "rotation.batch_size=2"]
    if cfg.qat.name != "none":
        tiny += ["qat.train.steps=1", "qat.train.batch_size=1", "qat.train.micro_batch_size=1",
                 "qat.train.checkpoint_every=0"]
    return tiny


def test_the_readme_has_the_commands_this_test_runs():
    cmds = readme_commands()
    assert len(cmds) >= 25 and any(c.startswith("spinquant export") for c, _ in cmds)
    assert sum(ill for _, ill in cmds) < len(cmds) / 2  # most examples really run


def test_every_readme_command_runs_or_composes(tmp_path, monkeypatch):
    """In a fresh folder, one after another as a user would type them (`spinquant tables results/demo` reads the rows
    the demo sweep wrote just before it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # plugins=[examples/...] is relative to the checkout
    from omegaconf import OmegaConf

    from spinquant.pipeline import RunConfig
    ran, composed = [], []
    for cmd, illustrative in readme_commands():
        words = shlex.split(cmd)
        if words[:2] == ["spinquant", "paper"]:  # regenerates paper/ of the checkout: tests/test_paper.py runs it
            composed.append(cmd)
            continue
        if words[0] == "spinquant" and words[1] in ("--help", "tables"):
            cli.main(words[1:])
            ran.append(cmd)
            continue
        if words[:3] == ["spinquant", "run", "--cfg"]:
            cli.main(words[1:])
            ran.append(cmd)
            continue
        if words[0] == "spinquant" and words[1] == "export":
            assert not illustrative, cmd
            cli.main(words[1:] + _tiny([w for w in words[3:] if "=" in w]))
            ran.append(cmd)
            continue
        overrides = _overrides(words)
        if illustrative or words[0] in ("accelerate", "torchrun"):
            cfg = cli.compose(*[o for o in overrides if not o.startswith(("hydra/launcher", "hydra.launcher"))])
            d = OmegaConf.to_container(cfg, resolve=False)
            d.pop("hydra", None)
            if cfg.model.get("seq_len") is None:
                d["model"]["seq_len"] = 512
            RunConfig.from_dict(OmegaConf.to_container(OmegaConf.create(d), resolve=True))
            composed.append(cmd)
            continue
        sweep = "-m" in words or words[:2] == ["spinquant", "sweep"]
        args = overrides + _tiny(overrides)
        cli._hydra_main(["spinquant", *(["-m"] if sweep else []), *args])
        ran.append(cmd)
    assert ran and composed
    rows = list((tmp_path / "results").rglob("*.json"))
    assert len(rows) >= 15  # the runs wrote their rows (demo: 7, plus the single runs)
    assert (tmp_path / "out" / "m.gguf").is_file() and (tmp_path / "out" / "m.pte").is_file()
    assert (tmp_path / "out" / "packed" / "spinquant.json").is_file()
