"""A workspace of one's own, from scratch, through the command line and the app: ``init`` on
an ImageFolder whose classes are not CIFAR's and whose input is 36 pixels, a tiny training
run, a gated recipe starting from a torchvision ``resnet18`` state dict, a classifier
exported with ``torch.export`` as the reference and as a cascade member, ``ship``,
``predict``, and every page of the app on that workspace."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn

from dynviz import settings, uploads, workspace, zoo
from dynviz.cli import main
from tests.helpers import run_page

pytestmark = pytest.mark.slow

SHARED = settings.PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"
RENAMED = {"airplane": "jet", "frog": "toad", "ship": "boat"}   # folder names, not CIFAR's
PER_CLASS = 50     # 45 train images a class: one batch of 128
SIZE = 36
PAGES = ("inspect", "budget", "galleries", "models")

ADDED = """
[systems.theirs]
kind = "static"
program = "exported/theirs.pt2"

[systems.both]
kind = "cascade"
members = ["resnet8", "theirs"]
topology = "jump"

[systems.gated18]
kind = "gated"
model = "lcnet_resnet18"
checkpoint = "gated18"

[recipes.gated18]
base = "lcnet_resnet56"
model = "lcnet_resnet18"
init_from = "tv_resnet18"
epochs = 1

[systems.exits18]
kind = "exits"
model = "exits_resnet20"
checkpoint = "exits18"
args = { backbone = "resnet18", exits = [3, 5], head_convs = 1 }

[recipes.exits18]
base = "exits_resnet56"
model = "exits_resnet20"
model_args = { backbone = "resnet18", exits = [3, 5], head_convs = 1 }
init_from = "tv_resnet18"
epochs = 1
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not SHARED.is_dir():
        pytest.skip(f"no images at {SHARED}")
    root = tmp_path_factory.mktemp("photos")
    for source, name in RENAMED.items():
        (root / name).mkdir()
        for path in sorted((SHARED / source).iterdir())[:PER_CLASS]:
            shutil.copy(path, root / name / path.name)
    return root


def _theirs() -> nn.Module:
    """A classifier from outside the registry: what a user exports from their own code."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_a_workspace_from_scratch(folder, tmp_path, monkeypatch, capsys):
    import torchvision

    monkeypatch.setenv("DYNVIZ_DEVICE", "cpu")
    for var in ("DYNVIZ_WORKSPACE", "DYNVIZ_CACHE", "DYNVIZ_CHECKPOINTS", "DYNVIZ_ASSETS"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "ws"
    assert main(["init", str(home), "--data", str(folder), "--image-size", str(SIZE)]) == 0
    ws = workspace.load(home)
    assert ws.data.classes == ("boat", "jet", "toad") and ws.data.image_size == SIZE

    # their classifier, exported with a dynamic batch; a torchvision resnet18 state dict
    (home / "exported").mkdir()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(_theirs(), (torch.randn(2, 3, SIZE, SIZE),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, home / "exported" / "theirs.pt2")
    (home / "checkpoints").mkdir()
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(),
               home / "checkpoints" / "tv_resnet18.pt")
    text = (home / workspace.FILE).read_text().replace('reference = "resnet56"',
                                                       'reference = "theirs"')
    (home / workspace.FILE).write_text(text + ADDED)
    ws = workspace.load(home)

    here = ["--workspace", str(home)]
    assert main(here + ["train", "resnet8", "--epochs", "1", "--limit-batches", "2"]) == 0
    assert main(here + ["train", "gated18", "--limit-batches", "2"]) == 0
    assert main(here + ["train", "exits18", "--limit-batches", "2"]) == 0
    assert set(zoo.available(ws)) == {"resnet8", "theirs", "both", "gated18", "exits18"}
    # the gated net started from the torchvision weights: its convolutions moved only a
    # little in two steps, its gates are new
    gated = torch.load(home / "checkpoints" / "gated18.pt", weights_only=True)
    start = torch.load(home / "checkpoints" / "tv_resnet18.pt", weights_only=True)
    assert torch.allclose(gated["layer4.1.conv2.weight"], start["layer4.1.conv2.weight"],
                          atol=1e-2)
    assert any("_gate." in k for k in gated) and not any("_gate." in k for k in start)
    # the exit heads trained on the torchvision backbone, which stayed as it was
    exits = torch.load(home / "checkpoints" / "exits18.pt", weights_only=True)
    assert all(torch.equal(exits[f"backbone.{k}"], v) for k, v in start.items()
               if not k.startswith("fc.") and v.is_floating_point())

    capsys.readouterr()
    assert main(here + ["ship", "--no-timing"]) == 0
    results = json.loads((ws.results / "results.json").read_text())
    rows = {row["system"]: row for row in results["rows"]} if isinstance(results, dict) \
        else {row["system"]: row for row in results}
    assert {"resnet8", "theirs", "both", "gated18", "exits18"} <= set(rows)
    assert list((ws.results / "policies").glob("both-*.json"))

    # predict answers what the masked (reference) model answers on the same file
    image = folder / "toad" / sorted(p.name for p in (folder / "toad").iterdir())[0]
    x = ws.data.to_tensor(uploads.preprocess_upload(image.read_bytes(), SIZE)[None])
    for name in ("gated18", "both", "exits18"):
        capsys.readouterr()
        assert main(here + ["predict", name, str(image)]) == 0
        answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert answer["prediction"] in ws.data.classes, answer
        if name == "gated18":
            with torch.no_grad():
                logits = zoo.load_system(ws, name, torch.device("cpu"))(x).logits
            assert answer["prediction"] == ws.data.classes[int(logits.argmax())]

    # every page of the app serves this workspace
    monkeypatch.setenv("DYNVIZ_WORKSPACE", str(home))
    for page in PAGES:
        at = run_page(page)
        assert not at.exception and not at.error, (page, [e.value for e in at.exception])
        if page == "inspect":
            classes = [box for box in at.selectbox if box.key == "inspect_class"]
            assert classes and list(classes[0].options) == list(ws.data.classes)
