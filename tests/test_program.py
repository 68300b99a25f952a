"""Classifiers exported with ``torch.export`` as static systems (``models.program``): they answer
like the eager models they came from, cost what FlopCounterMode counts, run whatever batch
they were exported for, join cascades, and a file that is not one fails in one line."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import models
from models import ProgramError, load_program
from models.staged import Cascade
from tests.helpers import flops_macs, randomize

SIZE, CLASSES = 40, 4


class Logits(nn.Module):
    """What one exports of a dynviz model: its logits (an ``Output`` is not a tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def export(module: nn.Module, path, size: int = SIZE, dynamic_batch: bool = True):
    """Save ``module`` exported on (2, 3, size, size) images, batch dimension dynamic, or on
    one image with the batch fixed at 1."""
    x = torch.randn(2 if dynamic_batch else 1, 3, size, size)
    dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    torch.export.save(torch.export.export(module, (x,), dynamic_shapes=dims), path)
    return path


def images(batch: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


@pytest.fixture(scope="module")
def eager() -> dict[str, nn.Module]:
    """A registry ResNet and a classifier dynviz knows nothing of, eval mode, random BN."""
    sequential = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, CLASSES))
    resnet = models.create("resnet8", num_classes=CLASSES, input_size=SIZE)
    return {"resnet": randomize(resnet.eval(), seed=1),
            "sequential": randomize(sequential.eval(), seed=2)}


@pytest.fixture(scope="module")
def exported(eager, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("programs")
    return {"resnet": export(Logits(eager["resnet"]), root / "resnet.pt2"),
            "sequential": export(eager["sequential"], root / "sequential.pt2"),
            "resnet_batch1": export(Logits(eager["resnet"]), root / "resnet_batch1.pt2",
                                    dynamic_batch=False)}


def eager_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------------------- answers and cost
@pytest.mark.parametrize("name", ["resnet", "sequential"])
def test_program_answers_like_its_eager_model(name, eager, exported):
    program = load_program(exported[name], SIZE, CLASSES)
    assert program.batched
    for batch in (1, 3):
        x = images(batch)
        with torch.no_grad():
            out = program(x)
            torch.testing.assert_close(out.logits, eager_logits(eager[name], x),
                                       atol=1e-5, rtol=0)
        assert out.macs.tolist() == [program.macs()] * batch
        assert out.stage_macs.shape == (batch, 1)


@pytest.mark.parametrize("name", ["resnet", "sequential"])
def test_program_macs_are_the_flop_counters_on_the_eager_model(name, eager, exported):
    program = load_program(exported[name], SIZE, CLASSES)
    with torch.no_grad():
        counted = flops_macs(lambda: eager[name](images(1)))
    assert program.macs() == counted > 0
    if name == "resnet":     # and our own MAC table agrees
        assert program.macs() == eager["resnet"].macs()
    assert program.stage_macs() == [program.macs()] and program.n_stages == 1
    assert program.dense_counterpart() is program
    assert program.cache_layout() == {}


def test_a_program_for_one_image_runs_a_batch_image_by_image(eager, exported):
    program = load_program(exported["resnet_batch1"], SIZE, CLASSES)
    assert not program.batched
    x = images(3)
    with torch.no_grad():
        out = program(x)
        torch.testing.assert_close(out.logits, eager["resnet"](x).logits, atol=1e-5, rtol=0)
        assert program(x[:0]).logits.shape == (0, CLASSES)
    assert out.macs.tolist() == [eager["resnet"].macs()] * 3


def test_a_cascade_takes_a_program_as_a_stage(eager, exported):
    resnet = eager["resnet"]
    program = load_program(exported["sequential"], SIZE, CLASSES)
    cascade = Cascade([resnet, program], ["resnet8", "program"]).eval()
    x = images(3)
    with torch.no_grad():
        out = cascade(x)
        torch.testing.assert_close(out.stage_logits[:, 0], resnet(x).logits)
        torch.testing.assert_close(out.stage_logits[:, 1], eager["sequential"](x),
                                   atol=1e-5, rtol=0)
    assert cascade.stage_macs() == [resnet.macs(), program.macs()]
    assert out.stage_macs.tolist() == [[resnet.macs(), program.macs()]] * 3
    assert out.trace.jump_macs.tolist() == [program.macs()] * 3


def test_train_eval_and_copies_leave_the_exported_answer(eager, exported):
    """An exported graph refuses train()/eval(); ours only flips the flag (the graph keeps the
    inference batch norm it was exported with), and a copy (what folding makes) answers
    the same."""
    program = load_program(exported["resnet"], SIZE, CLASSES)
    x = images(2)
    with torch.no_grad():
        expected = eager["resnet"](x).logits
        assert program.train().training
        torch.testing.assert_close(program(x).logits, expected, atol=1e-5, rtol=0)
        copied = copy.deepcopy(program).eval()
        assert not copied.training
        torch.testing.assert_close(copied(x).logits, expected, atol=1e-5, rtol=0)


class Normalised(nn.Module):
    """A classifier holding a tensor that is neither parameter nor buffer (export keeps it
    as a constant), and a literal computed with."""

    def __init__(self):
        super().__init__()
        self.mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 2))

    def forward(self, x):
        return self.net((x - self.mean) * torch.tensor(2.0))


def test_to_moves_the_constants_of_a_program(tmp_path):
    module = Normalised().eval()
    program = load_program(export(module, tmp_path / "norm.pt2", size=8), 8, 2)
    program.to(torch.bfloat16)    # a device move takes the same path, and CPU has no second
    x = images(2, size=8)
    with torch.no_grad():
        logits = program(x.to(torch.bfloat16)).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), module(x), atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------- bad files
class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, CLASSES)

    def forward(self, x):
        features = x.mean((2, 3))
        return self.fc(features), features


def _tiny(classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


def _missing(tmp_path):
    return tmp_path / "absent.pt2", "no such file"


def _garbage(tmp_path):
    (tmp_path / "garbage.pt2").write_bytes(b"\x00not a program\xff" * 50)
    return tmp_path / "garbage.pt2", "not a torch.export program"


def _checkpoint(tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "weights.pt2")   # a zip, but of weights
    return tmp_path / "weights.pt2", "not a torch.export program"


def _wrong_classes(tmp_path):
    return export(_tiny(classes=CLASSES + 1).eval(), tmp_path / "five.pt2", size=8), \
        f"shape (2, {CLASSES + 1}), not (2, {CLASSES})"


def _tuple(tmp_path):
    return export(Pair().eval(), tmp_path / "pair.pt2", size=8), "answers with a tuple of 2"


def _wrong_size(tmp_path):
    return export(_tiny().eval(), tmp_path / "small.pt2", size=6), "fails on a (1, 3, 8, 8) input"


def _training_mode(tmp_path):
    return export(_tiny().train(), tmp_path / "train.pt2", size=8), "training mode"


def _batch_of_2(tmp_path):
    path = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(_tiny().eval(), (torch.randn(2, 3, 8, 8),)), path)
    return path, "runs a batch of 2 but not one image: export it with a dynamic batch"


def _batch_of_3(tmp_path):
    path = tmp_path / "three.pt2"
    torch.export.save(torch.export.export(_tiny().eval(), (torch.randn(3, 3, 8, 8),)), path)
    return path, "input.size()[0] == 3; export it for (1, 3, 8, 8) inputs, the batch fixed at 1"


@pytest.mark.parametrize("make", [_missing, _garbage, _checkpoint, _wrong_classes, _tuple,
                                  _wrong_size, _training_mode, _batch_of_2, _batch_of_3])
def test_a_file_that_is_not_a_classifier_fails_in_one_line_naming_it(make, tmp_path):
    path, says = make(tmp_path)
    with pytest.raises(ProgramError) as caught:
        load_program(path, 8, CLASSES)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert says in message
    assert isinstance(caught.value, ValueError)
