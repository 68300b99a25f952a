"""Workspaces: dynviz.toml read back as written, one clear line for every malformed key,
the built-in workspace is the repository's CIFAR-10 zoo, and ``init`` writes a starter that
describes the ImageFolder it was given (classes, size, split, statistics computed here
independently)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dynviz import data, scaffold, workspace
from tests.helpers import make_imagefolder, workspace_toml

CLASSES = ("kiwi", "emu", "moa")
SYSTEMS = {"small": {"kind": "static", "model": "resnet8", "checkpoint": "resnet8"},
           "theirs": {"kind": "static", "program": "exported/theirs.pt2"},
           "both": {"kind": "cascade", "members": ["small", "theirs"], "topology": "jump"}}
# the helper's mean and std: 0.5 and 0.25 a channel; the malformed-key tests edit its lines
GOOD = workspace_toml(CLASSES, 40, SYSTEMS, reference="small")


def _write(directory, text: str):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / workspace.FILE).write_text(text)
    return directory


def test_a_workspace_reads_back_what_its_file_says(tmp_path):
    ws = workspace.load(_write(tmp_path / "ws", GOOD))
    assert ws.data.classes == CLASSES and ws.data.image_size == 40
    assert ws.data.roots == (tmp_path / "ws" / "images",)          # relative to the file
    assert ws.data.mean == (0.5,) * 3 and ws.data.std == (0.25,) * 3
    assert list(ws.systems) == ["small", "theirs", "both"] and ws.reference == "small"
    assert ws.spec("small").weights == (("", "resnet8"),)
    assert ws.program_path(ws.spec("theirs")) == tmp_path / "ws" / "exported" / "theirs.pt2"
    assert ws.spec("both").members == ("small", "theirs") and ws.spec("both").topology == "jump"
    assert ws.checkpoints == tmp_path / "ws" / "checkpoints" and not ws.builtin
    absolute = workspace_toml(CLASSES, 40, SYSTEMS, reference="small",
                              root=str(tmp_path / "elsewhere"))
    assert workspace.load(_write(tmp_path / "abs", absolute)).data.roots == (
        tmp_path / "elsewhere",)


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.replace("image_size = 40", 'image_size = "big"'), "data.image_size"),
    (lambda t: t.replace("image_size = 40\n", ""), "data.image_size is missing"),
    (lambda t: t.replace('classes = ["kiwi", "emu", "moa"]', 'classes = ["kiwi"]'),
     "data.classes"),
    (lambda t: t.replace("mean = [0.5, 0.5, 0.5]", "mean = [0.5, 0.5]"), "data.mean"),
    (lambda t: t.replace("std = [0.25, 0.25, 0.25]", "std = [0.25, 0, 0.25]"), "data.std"),
    (lambda t: t.replace('kind = "cascade"', 'kind = "ensemble"'), "systems.both.kind"),
    (lambda t: t.replace('members = ["small", "theirs"]', 'members = ["small", "nobody"]'),
     "systems.both.members"),
    (lambda t: t.replace('reference = "small"', 'reference = "both"'), "reference"),
    (lambda t: t.replace('checkpoint = "resnet8"', 'chekpoint = "resnet8"'),
     "systems.small.chekpoint"),
    (lambda t: t.replace('topology = "jump"', 'topology = "tree"'), "systems.both.topology"),
    (lambda t: t + "[data.extra]\n", "data.extra"),
    (lambda t: "refrence = \"small\"\n" + t, "unknown key refrence"),
    (lambda t: t + "[paths]\ncheckpoint = \"w\"\n", "unknown key paths.checkpoint"),
    (lambda t: t.replace('model = "resnet8"', 'model = "resnet9"'), "systems.small.model"),
    (lambda t: t.replace('model = "resnet8"', 'model = "resnet8"\nargs = { placment = 1 }'),
     "systems.small.args"),
    (lambda t: t.replace('model = "resnet8"', 'model = "lcnet_resnet8"'), "systems.small.kind"),
    (lambda t: t.replace('kind = "static"\nmodel', 'kind = "exits"\nmodel'),
     "systems.small.kind"),
    (lambda t: t.replace("[data]", "[data"), "not valid TOML"),
    (lambda t: t.replace('checkpoint = "resnet8"', 'weights = { "layer9" = "resnet8" }'),
     "systems.small.weights: resnet8 has no part 'layer9'"),
])
def test_a_malformed_file_is_one_line_naming_the_key(tmp_path, edit, named):
    with pytest.raises(workspace.WorkspaceError) as err:
        workspace.load(_write(tmp_path / "ws", edit(GOOD)))
    message = str(err.value)
    assert named in message and "\n" not in message and workspace.FILE in message


def test_a_directory_without_a_file_says_how_to_start_one(tmp_path):
    with pytest.raises(workspace.WorkspaceError, match="dynviz init"):
        workspace.load(tmp_path)


def test_the_workspace_is_the_argument_else_the_environment_else_the_builtin(tmp_path,
                                                                              monkeypatch):
    own = _write(tmp_path / "ws", GOOD)
    monkeypatch.delenv("DYNVIZ_WORKSPACE", raising=False)
    assert workspace.resolve().builtin
    monkeypatch.setenv("DYNVIZ_WORKSPACE", str(own))
    assert workspace.resolve().root == own.resolve()
    assert workspace.resolve(workspace.builtin().root).root == workspace.builtin().root
    # the repository named as a directory is the built-in workspace, with its guards
    assert workspace.resolve(workspace.builtin().root).builtin


def test_without_the_repository_the_builtin_workspace_says_to_name_one(tmp_path, monkeypatch,
                                                                       capsys):
    from dynviz import settings
    from dynviz.cli import main

    monkeypatch.setattr(settings, "PROJECT_ROOT", tmp_path)    # a non-editable install
    monkeypatch.delenv("DYNVIZ_WORKSPACE", raising=False)
    with pytest.raises(workspace.WorkspaceError, match="--workspace DIR"):
        workspace.builtin()
    assert main(["data"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DYNVIZ_WORKSPACE" in err[0]


def test_what_a_system_needs_is_named_with_what_to_do(tmp_path, capsys):
    from dynviz import zoo
    from dynviz.cli import main

    ws = workspace.load(_write(tmp_path / "ws", GOOD))   # nothing trained, no program
    make_imagefolder(ws.root / "images", 20, size=40, classes=CLASSES)
    program = ws.root / "exported" / "theirs.pt2"
    assert zoo.missing(ws, "both") == [zoo.Need(checkpoint="resnet8"),
                                       zoo.Need(program=program)]
    train = f"python -m dynviz --workspace {ws.root} train resnet8 --out-dir {ws.checkpoints}"
    assert [n.fix(ws, markdown=True) for n in zoo.missing(ws, "both")] == [
        f"run `{train}`", f"add the torch.export program `{program}`"]
    assert zoo.missing(ws, "both")[1].fix(ws) == f"add the torch.export program {program}"
    with pytest.raises(ValueError, match="exactly one"):
        zoo.Need()
    with pytest.raises(zoo.MissingCheckpointError) as err:
        zoo.load_system(ws, "both")
    assert train in str(err.value) and str(program) in str(err.value)
    assert main(["--workspace", str(ws.root), "cache", "--model", "theirs"]) == 0
    said = capsys.readouterr().err.strip()
    assert said == f"theirs: skipped, not ready: add the torch.export program {program}"


def test_the_builtin_workspace_is_the_cifar10_zoo():
    ws = workspace.builtin()
    assert ws.builtin and ws.data.n_classes == 10 and ws.data.image_size == 32
    assert ws.data.classes[0] == "airplane" and ws.data.val_per_class == 500
    assert ws.reference == "resnet56" and ws.featured in ws.systems


# ---------------------------------------------------------------------------- init
def _folder(root, per_class=(25, 31, 20)):
    """Random 36×36 images in the first two classes; the third's are 60×50 and of one colour
    each, so that resizing them to 36 changes no pixel value (an exact reference below)."""
    rng = np.random.default_rng(0)
    for k, (name, n) in enumerate(zip(CLASSES, per_class)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            if k < 2:
                pixels = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
            else:
                pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (50, 60, 3))
            Image.fromarray(np.ascontiguousarray(pixels)).save(root / name / f"{i:03d}.png")
    return root


def test_init_describes_the_imagefolder(tmp_path):
    root = _folder(tmp_path / "images")
    path = scaffold.starter(tmp_path / "ws", root)
    ws = workspace.load(path.parent)
    assert ws.data.classes == tuple(sorted(CLASSES))            # folder names, sorted
    assert ws.data.image_size == 36                             # the median short side
    # the split: the last 10% of every class's files by name, halved even/odd
    dataset = ws.dataset()
    expected_val = []
    for name in sorted(CLASSES):
        files = sorted(p.name for p in (root / name).iterdir())
        n_val = max(2, int(len(files) * 0.1 + 0.5))       # the nearest, halves up
        expected_val += [f"{name}/{f}" for f in files[-n_val:]]
    assert ws.split("val").ids == expected_val
    assert ws.split("fit").ids == expected_val[0::2]
    assert ws.split("check").ids == expected_val[1::2]
    # mean and std of the train images, computed here from the files themselves
    val = set(expected_val)
    train = [np.asarray(Image.open(root / i).convert("RGB"), dtype=np.float64)[:36, :36] / 255
             for i in dataset.ids if i not in val]
    pixels = np.stack(train).reshape(-1, 3)
    assert ws.data.mean == pytest.approx(pixels.mean(0), abs=1e-4)   # written to 4 places
    assert ws.data.std == pytest.approx(pixels.std(0), abs=1e-4)
    # the default systems, each listed with its command
    assert {"resnet8", "lcnet_resnet56", "exits_resnet56", "cascade_r8_r20_r56"} <= set(
        ws.systems)
    assert "train resnet8" in path.read_text()


def test_init_refuses_what_is_not_a_usable_imagefolder(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        scaffold.starter(tmp_path / "a", make_imagefolder(tmp_path / "one", 25,
                                                          classes=("only",)))
    with pytest.raises(ValueError, match="class emu has 19 images"):
        scaffold.starter(tmp_path / "b", _folder(tmp_path / "few", per_class=(25, 19, 25)))
    ok = _folder(tmp_path / "ok")
    scaffold.starter(tmp_path / "c", ok, image_size=24)
    with pytest.raises(ValueError, match="--force"):
        scaffold.starter(tmp_path / "c", ok)
    assert workspace.load(tmp_path / "c").data.image_size == 24
    assert data.MIN_PER_CLASS == 20


@pytest.mark.slow
def test_the_smallest_imagefolder_init_takes_trains_with_the_commands_it_lists(
        tmp_path, monkeypatch, capsys):
    from dynviz import recipes
    from dynviz.cli import main

    monkeypatch.setenv("DYNVIZ_DEVICE", "cpu")
    root = make_imagefolder(tmp_path / "two", data.MIN_PER_CLASS, size=16, classes=CLASSES[:2])
    path = scaffold.starter(tmp_path / "ws", root)
    ws = workspace.load(path.parent)
    n_train = len(ws.split("train"))
    known = recipes.for_workspace(ws)
    for name in scaffold.TRAINED:                       # the largest power of 2 with 4 steps
        built_in, size = recipes.RECIPES[name], known[name].batch_size
        assert n_train // size >= 4 and n_train // (2 * size) < 4, name
        scale = size / built_in.batch_size                  # learning rates in proportion
        assert known[name].peak_lr == pytest.approx(built_in.peak_lr * scale)
        assert known[name].gate_lr == (None if built_in.gate_lr is None else
                                       pytest.approx(built_in.gate_lr * scale))
        assert known[name].epochs == built_in.epochs        # the rest as built in
    command = next(line for line in path.read_text().splitlines() if "train resnet8" in line)
    argv = command.split("python -m dynviz ")[1].split() + ["--epochs", "1"]
    assert main(argv) == 0 and (path.parent / "checkpoints" / "resnet8.pt").exists()
    capsys.readouterr()
    assert scaffold.smaller_batches(4 * 128) == {}
    assert {k: v["batch_size"] for k, v in scaffold.smaller_batches(4 * 128 - 1).items()} == {
        name: 64 for name in scaffold.TRAINED}


def test_init_skips_hidden_folders_and_names_an_unreadable_image(tmp_path):
    root = _folder(tmp_path / "images")
    (root / ".ipynb_checkpoints").mkdir()
    ws = workspace.load(scaffold.starter(tmp_path / "ws", root).parent)
    assert ws.data.classes == tuple(sorted(CLASSES)) and len(ws.dataset()) == 76
    (root / "emu" / "999.png").write_bytes(b"not a png")
    with pytest.raises(ValueError) as err:
        scaffold.starter(tmp_path / "ws2", root)
    assert "999.png: not a readable image" in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_trained_on_other_classes_is_refused(tmp_path):
    import json

    import torch

    from dynviz import zoo

    home = _write(tmp_path / "ws", GOOD)
    ws = workspace.load(home)
    ws.checkpoints.mkdir()
    torch.save(zoo.create_model(ws, ws.spec("small")).state_dict(), ws.checkpoints / "resnet8.pt")
    zoo.load_system(ws, "small", torch.device("cpu"))            # no manifest: loads
    manifest = ws.checkpoints / "resnet8.json"
    manifest.write_text(json.dumps({"classes": ["kiwi", "moa", "emu"], "image_size": 40}))
    with pytest.raises(zoo.CheckpointError, match="trained on the classes kiwi, moa, emu"):
        zoo.load_system(ws, "small", torch.device("cpu"))
    manifest.write_text(json.dumps({"classes": list(CLASSES), "image_size": 32}))
    with pytest.raises(zoo.CheckpointError, match="32×32"):
        zoo.load_system(ws, "small", torch.device("cpu"))
