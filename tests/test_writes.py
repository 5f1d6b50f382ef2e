"""Writers never remove what they did not write: every output (packed folder, compressed-tensors folder, GGUF and
ExecuTorch files, rotation files, results rows) goes through `spinquant.writes`, refuses a target it would damage
before any work, keeps a user's other files, and leaves no temporary file behind on failure."""
import json

import pytest
import torch

from spinquant import export, writes
from spinquant.quant import QuantConfig, quantize_
from spinquant.writes import MANIFEST, OutputPathError
from tests.conftest import make_tiny


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))]


# ---- the helper ---------------------------------------------------------------------------------------------------

def test_folder_with_foreign_files_is_refused_then_kept_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"holds files not written by w.*keep.txt.*overwrite"):
        with writes.write_dir(out, "w") as tmp:
            (tmp / "a.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not _leftovers(tmp_path)
    with writes.write_dir(out, "w", overwrite=True) as tmp:
        (tmp / "a.bin").write_text("new")
    assert (out / "keep.txt").read_text() == "mine" and (out / "a.bin").read_text() == "new"
    # now a previous output of "w": rewriting replaces exactly its own files, keeps keep.txt, drops stale ones
    with writes.write_dir(out, "w") as tmp:
        (tmp / "b.bin").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "b.bin", "keep.txt"])
    assert json.loads((out / MANIFEST).read_text()) == {"writer": "w", "files": ["b.bin"]}
    # another writer's output is foreign to this one
    with pytest.raises(OutputPathError, match="not written by other"):
        writes.check_dir(out, "other")


def test_previous_output_alone_is_swapped_whole(tmp_path):
    out = tmp_path / "out"
    with writes.write_dir(out, "w") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("1")
        (tmp / "y").write_text("1")
    with writes.write_dir(out, "w") as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "y"]) and (out / "y").read_text() == "2"
    assert not _leftovers(tmp_path)


def test_failure_inside_a_write_leaves_the_target_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    with writes.write_dir(out, "w") as tmp:
        (tmp / "a").write_text("old")
    for ctx in (writes.write_dir(out, "w"), writes.write_file(tmp_path / "f.bin", "w")):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx as tmp:
                (tmp / "a").write_text("new") if tmp.is_dir() else tmp.write_text("new")
                raise RuntimeError("boom")
    assert (out / "a").read_text() == "old" and not (tmp_path / "f.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_file_targets_of_the_wrong_kind_are_refused_before_work(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputPathError, match="is an existing folder; give a file name"):
        writes.check_file(tmp_path / "adir", "GGUF")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="exists and is not recognised as GGUF output.*overwrite"):
        writes.check_file(tmp_path / "notes.txt", "GGUF", recognise=lambda p: p.read_bytes()[:4] == b"GGUF")
    (tmp_path / "old.gguf").write_bytes(b"GGUF....")
    writes.check_file(tmp_path / "old.gguf", "GGUF", recognise=lambda p: p.read_bytes()[:4] == b"GGUF")  # its own
    writes.check_file(tmp_path / "notes.txt", "GGUF", overwrite=True)
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputPathError, match="afile is a file, not a folder"):
        writes.check_file(tmp_path / "afile" / "m.gguf", "GGUF")
    with pytest.raises(OutputPathError, match="exists and is a file"):
        writes.check_dir(tmp_path / "afile", "w")
    with pytest.raises(OutputPathError, match="more than the OS allows"):
        writes.check_dir(tmp_path / ("x" * 5000), "w")
    with pytest.raises(OutputPathError, match="more than the OS allows"):
        writes.check_file(tmp_path / ("d" * 200) / ("x" * 300), "w")


# ---- each writer --------------------------------------------------------------------------------------------------

def _packed():
    model = make_tiny("llama")
    quantize_(model, QuantConfig(scheme="W4A8"), progress=False)
    return model


def test_packed_save_keeps_a_users_file_and_onto_a_file_is_refused_cleanly(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = _packed()
    with pytest.raises(OutputPathError, match="keep.txt"):
        export.save(model, out)
    export.save(model, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    export.load(out)
    export.save(model, out)  # its own output: replaced without overwrite, keep.txt still there
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="exists and is a file"):
        export.save(model, tmp_path / "f")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "m"]  # no *.tmp left behind


def test_cli_export_into_a_folder_with_keep_txt_refuses_before_loading_then_keeps_it(tmp_path, monkeypatch):
    from spinquant import cli, pipeline
    out = tmp_path / "dir"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    real = pipeline.load

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(pipeline, "load", no_load)
    for fmt in ("packed", "compressed-tensors"):
        with pytest.raises(OutputPathError, match="keep.txt"):
            cli.main(["export", str(out), "--format", fmt, "model=stories260k", "quant=w4a16"])
    with pytest.raises(OutputPathError, match="is an existing folder"):
        cli.main(["export", str(out), "--format", "gguf", "model=stories260k", "quant=gguf_q4_0"])
    with pytest.raises(OutputPathError, match="is an existing folder"):
        cli.main(["export", str(out), "--format", "executorch", "model=stories260k", "quant=executorch_w4a8"])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="not recognised as GGUF"):
        cli.main(["export", str(tmp_path / "notes.txt"), "--format", "gguf", "model=stories260k", "quant=gguf_q4_0"])
    with pytest.raises(OutputPathError, match="not recognised as ExecuTorch"):
        cli.main(["export", str(tmp_path / "notes.txt"), "--format", "executorch", "model=stories260k",
                  "quant=executorch_w4a8"])
    monkeypatch.setattr(pipeline, "load", real)
    cli.main(["export", str(out), "--overwrite", "model=stories260k", "quant=w4a8", "quant.group_fallback=channel",
              "progress=false"])
    assert (out / "keep.txt").read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "mine"
    assert (out / export.WEIGHTS).is_file()


def test_gguf_replaces_its_own_file_only(tmp_path):
    from spinquant.gguf_export import export_gguf
    from spinquant.models.load import resolve_path
    from spinquant.pipeline import load_model
    model, _ = load_model("stories260k")
    quantize_(model, QuantConfig(scheme="GGUF-Q8_0", group_fallback="none"), progress=False)
    notes = tmp_path / "m.gguf"
    notes.write_text("mine")
    with pytest.raises(OutputPathError, match="not recognised as GGUF"):
        export_gguf(model, notes, resolve_path("stories260k"))
    assert notes.read_text() == "mine"
    out = tmp_path / "n.gguf"
    export_gguf(model, out, resolve_path("stories260k"))
    first = out.read_bytes()
    export_gguf(model, out, resolve_path("stories260k"))  # its own file: replaced
    assert out.read_bytes() == first and first[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "n.gguf"]


def test_rotation_file_and_results_row_refuse_foreign_files(tmp_path):
    from spinquant.results import write_row
    from spinquant.rotation.spinquant import check_config, load_rotations, model_fingerprint, save_rotations
    model = make_tiny("llama")
    notes = tmp_path / "rot.pt"
    notes.write_text("mine")
    with pytest.raises(OutputPathError, match="not recognised as spinquant rotation"):
        check_config({"save": str(notes)})  # before training
    with pytest.raises(OutputPathError, match="not recognised as spinquant rotation"):
        save_rotations(notes, torch.eye(64), [torch.eye(16)], model_fingerprint(model))
    good = tmp_path / "good.pt"
    save_rotations(good, torch.eye(64), [torch.eye(16)] * 2, model_fingerprint(model))
    save_rotations(good, 2 * torch.eye(64), [torch.eye(16)] * 2, model_fingerprint(model))  # replaced
    assert torch.equal(load_rotations(good, model)[0], 2 * torch.eye(64))
    row = {"experiment": "e", "run_id": "r", "model": "m", "scheme": "W4A8", "method": {}, "spec": {}, "metrics": {},
           "seed": 0, "git_rev": "abc", "config": {}}
    (tmp_path / "r.json").write_text("my notes")
    with pytest.raises(OutputPathError, match="not recognised as results row"):
        write_row(row, tmp_path / "r.json")
    write_row(row, tmp_path / "s.json")
    write_row({**row, "seed": 1}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["seed"] == 1
    assert (tmp_path / "r.json").read_text() == "my notes"


def test_compressed_tensors_keeps_a_users_file_with_overwrite(tmp_path):
    from spinquant.ct_export import export_compressed_tensors
    model = make_tiny("llama")
    quantize_(model, QuantConfig(scheme="W4A16"), progress=False)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="keep.txt"):
        export_compressed_tensors(model, out)
    export_compressed_tensors(model, out, overwrite=True)
    export_compressed_tensors(model, out)  # its own output now
    assert (out / "keep.txt").read_text() == "mine" and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_unwritable_export_target_is_named_as_such_not_as_a_results_folder():
    from spinquant import cli
    with pytest.raises(OutputPathError, match=r"cannot write GGUF file /proc/m.gguf: /proc is not writable"):
        cli.main(["export", "/proc/m.gguf", "--format", "gguf", "model=stories260k", "quant=gguf_q4_0"])


def test_generated_tables_replace_their_file_atomically(tmp_path, monkeypatch):
    """`spinquant tables --out/--latex/--splice` and `spinquant paper` write through writes.write_text: the new text
    replaces the old whole; a failure before the rename leaves the old text and no temporary; a folder is refused."""
    from spinquant import writes
    from spinquant.report import tables
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- BEGIN t -->\nold\n<!-- END t -->\ntail\n")
    tables.splice(doc, "t", "new\n")
    assert doc.read_text() == "intro\n<!-- BEGIN t -->\nnew\n<!-- END t -->\ntail\n"

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(writes.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        tables.splice(doc, "t", "newer\n")
    assert doc.read_text() == "intro\n<!-- BEGIN t -->\nnew\n<!-- END t -->\ntail\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    monkeypatch.undo()
    (tmp_path / "table.md").mkdir()
    with pytest.raises(writes.OutputPathError, match="existing folder"):
        writes.write_text(tmp_path / "table.md", "x")
