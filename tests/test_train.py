"""The training loop: resume reproduces an uninterrupted run, data-parallel ranks stay in
step, the manifest describes what was written, LC-Net's penalty is its formula, and a
workspace of one's own trains models for its classes and image size into its checkpoints."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from dynviz import recipes, settings, train, workspace, zoo
from dynviz.cli import main
from dynviz.recipes import RECIPES, Recipe
from tests.helpers import flops_macs, make_imagefolder, workspace_toml

TINY = dataclasses.replace(RECIPES["resnet8"], epochs=2, batch_size=16, bf16=False)


def _into_zoo(ws, name: str, recipe: Recipe, **kwargs) -> dict:
    """Train ``name`` into the workspace's checkpoints, over an earlier one."""
    return train.train(ws, name, recipe, out_dir=ws.checkpoints, replace=True,
                       progress=False, **kwargs)


@pytest.fixture
def train_env(small_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNVIZ_DATA", str(small_cifar))
    monkeypatch.setenv("DYNVIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DYNVIZ_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.setenv("DYNVIZ_DEVICE", "cpu")
    monkeypatch.delenv("DYNVIZ_WORKSPACE", raising=False)
    return tmp_path


@pytest.fixture
def tws(train_env):
    """The built-in workspace on the synthetic CIFAR-10 of ``train_env``."""
    return workspace.builtin()


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stopped_in_second_epoch(tws, name: str, recipe: Recipe, monkeypatch,
                             limit_batches: int) -> None:
    """Trains ``name`` until its second epoch's evaluation, where the run is killed: epoch 1
    is checkpointed, epoch 2 is lost."""
    real_eval, calls = train.evaluate_accuracy, {"n": 0}

    def crash_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate_accuracy", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.fit(tws, name, recipe, limit_batches=limit_batches, progress=False)
    monkeypatch.setattr(train, "evaluate_accuracy", real_eval)


def test_resume_reproduces_the_uninterrupted_run(tws, monkeypatch):
    straight = train.fit(tws, "straight", TINY, limit_batches=2, progress=False)
    _stopped_in_second_epoch(tws, "interrupted", TINY, monkeypatch, limit_batches=2)
    resumed = train.fit(tws, "interrupted", TINY, resume=True, limit_batches=2, progress=False)

    assert resumed.state.epoch == straight.state.epoch == 2
    assert _same_weights(resumed.model.state_dict(), straight.model.state_dict())
    assert [h["train_loss"] for h in resumed.state.history] == \
        [h["train_loss"] for h in straight.state.history]


def test_resume_refuses_another_recipe_and_names_what_differs(tws):
    one = dataclasses.replace(TINY, epochs=1)
    train.fit(tws, "run", one, limit_batches=1, progress=False)
    last = train.run_dir(tws, "run") / "last.pt"
    with pytest.raises(ValueError) as refused:
        train.fit(tws, "run", dataclasses.replace(one, peak_lr=one.peak_lr / 2), resume=True,
                  limit_batches=1, progress=False)
    assert str(refused.value) == (f"{last} is a run of another recipe (peak_lr = {one.peak_lr!r} "
                                  f"there, {one.peak_lr / 2!r} now): give the same recipe and "
                                  f"options to continue it, or delete it to start over")


def test_an_unfinished_run_is_kept_unless_resumed_and_a_missing_one_is_said(tws, monkeypatch,
                                                                           caplog):
    _stopped_in_second_epoch(tws, "kept", TINY, monkeypatch, limit_batches=1)
    last = train.run_dir(tws, "kept") / "last.pt"
    before = last.read_bytes()
    with pytest.raises(ValueError) as refused:                 # --resume forgotten
        train.fit(tws, "kept", TINY, limit_batches=1, progress=False)
    assert str(refused.value) == (f"{last} holds 1 of {TINY.epochs} epochs of an unfinished "
                                  f"run: add --resume to continue it, or delete it to start over")
    assert last.read_bytes() == before
    done = train.fit(tws, "kept", TINY, resume=True, limit_batches=1, progress=False)
    assert done.state.epoch == TINY.epochs
    train.fit(tws, "kept", TINY, limit_batches=1, progress=False)   # finished: may start over
    with caplog.at_level("WARNING", logger="dynviz.train"):
        train.fit(tws, "fresh", dataclasses.replace(TINY, epochs=1), resume=True,
                  limit_batches=1, progress=False)
    assert f"nothing to resume at {train.run_dir(tws, 'fresh') / 'last.pt'}" in caplog.text


def _lr_per_step(monkeypatch) -> list[float]:
    """Records the LR of the first parameter group at every optimizer step."""
    seen, real_step = [], torch.optim.SGD.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return seen


def test_cycles_repeat_the_one_cycle_schedule(tws, monkeypatch):
    lrs = _lr_per_step(monkeypatch)
    train.fit(tws, "cycles", dataclasses.replace(TINY, epochs=4, cycles=2), limit_batches=5,
              progress=False)
    lrs = list(lrs)
    # reference: torch's OneCycleLR over one cycle (2 epochs of 5 steps), twice
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=TINY.peak_lr, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TINY.peak_lr, total_steps=10,
                                              pct_start=TINY.warmup, div_factor=10.0,
                                              final_div_factor=100.0)
    cycle = []
    for _ in range(10):
        cycle.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert lrs == pytest.approx(cycle * 2)
    assert lrs[10] == pytest.approx(TINY.peak_lr / 10) and lrs[9] < lrs[10]   # a restart


def test_a_finished_run_goes_on_with_more_cycles(tws):
    one = dataclasses.replace(TINY, epochs=1, cycles=1)
    two = dataclasses.replace(TINY, epochs=2, cycles=2)
    straight = train.fit(tws, "straight", two, limit_batches=2, progress=False)
    train.fit(tws, "extended", one, limit_batches=2, progress=False)
    extended = train.fit(tws, "extended", two, resume=True, limit_batches=2, progress=False)
    assert _same_weights(extended.model.state_dict(), straight.model.state_dict())
    assert extended.state.history == [
        {**h, "seconds": e["seconds"]} for h, e in zip(straight.state.history,
                                                       extended.state.history)]
    longer_cycles = dataclasses.replace(TINY, epochs=4, cycles=2)   # cycle of 2, not 1
    with pytest.raises(ValueError, match="another recipe"):
        train.fit(tws, "extended", longer_cycles, resume=True, limit_batches=1, progress=False)


def test_an_unfinished_run_cannot_take_more_cycles(tws, monkeypatch):
    # a 2-epoch cycle, stopped after epoch 1
    _stopped_in_second_epoch(tws, "unfinished", dataclasses.replace(TINY, epochs=2),
                             monkeypatch, limit_batches=1)
    with pytest.raises(ValueError, match="another recipe"):
        train.fit(tws, "unfinished", dataclasses.replace(TINY, epochs=4, cycles=2), resume=True,
                  limit_batches=1, progress=False)


def test_resume_refuses_a_run_whose_starting_checkpoint_was_retrained(tws):
    base = dataclasses.replace(TINY, epochs=1)
    _into_zoo(tws, "base", base, limit_batches=1)
    child = dataclasses.replace(TINY, epochs=2, init_from="base")
    train.fit(tws, "child", child, epochs=1, limit_batches=1, progress=False)  # interrupted
    train.fit(tws, "child", child, epochs=1, resume=True, limit_batches=1, progress=False)
    _into_zoo(tws, "base", dataclasses.replace(base, seed=1), limit_batches=1)
    with pytest.raises(ValueError, match="started from another base.pt"):
        train.fit(tws, "child", child, epochs=1, resume=True, limit_batches=1, progress=False)


def test_checkpoints_older_than_a_new_recipe_field_still_resume():
    saved = dataclasses.asdict(TINY)
    del saved["trainable"]              # written before the field existed
    assert train._saved_recipe(saved) == dataclasses.asdict(TINY)


def test_train_writes_weights_and_a_manifest_that_match(tws):
    manifest = train.train(tws, "tiny", dataclasses.replace(TINY, epochs=1), limit_batches=1,
                           progress=False)
    run = tws.cache / "runs" / "tiny"        # by default: not where the app loads
    assert not tws.checkpoints.exists()
    weights = run / "tiny.pt"
    on_disk = json.loads((run / "tiny.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["macs_dense"] == models.create("resnet8").macs()
    assert manifest["classes"] == list(tws.data.classes) and manifest["image_size"] == 32
    model = models.create("resnet8")
    model.load_state_dict(torch.load(weights, weights_only=True))  # weights only, strict
    for half in ("fit", "check"):
        assert 0.0 <= manifest["metrics"][half]["accuracy"] <= 1.0
    assert len(manifest["history"]) == 1


def test_training_over_a_checkpoint_the_app_loads_needs_replace(tws, monkeypatch, capsys):
    shipped = tws.checkpoints
    shipped.mkdir()
    (shipped / "tiny.pt").write_bytes(b"the shipped weights")

    def training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "fit", training)
    assert main(["train", "resnet8", "--name", "tiny", "--out-dir", str(shipped)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {shipped / 'tiny.pt'} exists") and "--replace" in line
    assert (shipped / "tiny.pt").read_bytes() == b"the shipped weights"
    with pytest.raises(AssertionError, match="training started"):
        main(["train", "resnet8", "--name", "tiny", "--out-dir", str(shipped), "--replace"])


class _RunsACommand:
    """Unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_the_resume_state_is_tensors_and_plain_data_read_weights_only(train_env, tws):
    one = dataclasses.replace(TINY, epochs=1)
    train.fit(tws, "run", one, limit_batches=1, progress=False)
    last = tws.cache / "runs" / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["recipe"] == dataclasses.asdict(one) and state["epoch"] == 1
    marker = train_env / "the-resume-state-ran-a-command"
    torch.save(dict(state, history=_RunsACommand(f"touch {marker}")), last)  # a foreign file
    with pytest.raises(ValueError) as err:
        train.fit(tws, "run", one, resume=True, limit_batches=1, progress=False)
    assert not marker.exists() and isinstance(err.value, zoo.CheckpointError)
    assert str(err.value) == (f"cannot read {last}: it holds more than tensors and plain "
                              "data (posix.system); delete it to start the run over, or drop "
                              "--resume")
    last.write_bytes(last.read_bytes()[:4096])
    with pytest.raises(zoo.CheckpointError, match="truncated or corrupt"):
        train.fit(tws, "run", one, resume=True, limit_batches=1, progress=False)
    with pytest.raises(zoo.CheckpointError) as err:       # nor a new run over it, unasked
        train.fit(tws, "run", one, limit_batches=1, progress=False)
    assert str(err.value).startswith(f"cannot read {last}: truncated or corrupt")
    assert str(err.value).endswith("; delete it to start the run over")


def test_sparsity_penalty_is_lcnets_l1_formula():
    model = models.create("lcnet_resnet8")
    for gate in (m for n, m in model.named_modules() if n.endswith("_gate.fc")):
        torch.nn.init.normal_(gate.weight, std=0.5)
    trace = model(torch.randn(3, 3, 32, 32)).trace
    recipe = dataclasses.replace(TINY, l1_block=0.3, l1_channel=0.7)
    s_l = trace.block_scores.detach()
    s_c = [s.detach() for s in trace.channel_scores]
    by_hand = (0.3 * s_l.abs().sum() / s_l.numel()
               + 0.7 * sum(s.abs().sum() for s in s_c) / sum(s.numel() for s in s_c))
    assert torch.allclose(train.sparsity_penalty(trace, recipe), by_hand)


def test_the_mac_target_is_a_squared_hinge_on_the_macs_scores_at_least_eps_count_whole():
    torch.manual_seed(0)
    model = models.create("lcnet_resnet8")
    for gate in (m for n, m in model.named_modules() if n.endswith("_gate.fc")):
        torch.nn.init.normal_(gate.weight, std=0.5)
    closed = [m for n, m in model.named_modules() if n.endswith("block_gate.fc")][1]
    torch.nn.init.constant_(closed.bias, -3.0)       # a leaky score below 0 in training
    trace = model(torch.randn(4, 3, 32, 32)).trace
    eps = 0.05
    # with every score 0 or ≥ ε the counted MACs are the MACs the trace says were spent
    spent = trace.cost.expected_macs((trace.block_scores >= eps).float(),
                                     [(c >= eps).float() for c in trace.channel_scores])
    hard = trace.cost.macs(trace.block_scores >= eps,
                           [c >= eps for c in trace.channel_scores])
    assert torch.equal(spent.round().long(), hard)
    # the hinge, by hand: each block's cost table times min(1, max(0, s)/ε), summed; a
    # negative training-time (leaky) score counts nothing, as inference skips its block
    assert (trace.block_scores < 0).any() and any((c < 0).any() for c in trace.channel_scores)
    costs = trace.cost.blocks
    clip = lambda s: min(1.0, max(0.0, float(s) / eps))   # noqa: E731
    by_hand = []
    for i in range(4):
        total = trace.cost.fixed + sum(b.always for b in costs)
        for k, b in enumerate(costs):
            channels = sum(clip(v) for v in trace.channel_scores[k][i])
            total += clip(trace.block_scores[i, k]) * (b.branch + b.per_channel * channels)
        by_hand.append(total)
    mean = sum(by_hand) / 4
    for target in (mean / 1.2, mean * 1.1):
        recipe = dataclasses.replace(TINY, mac_target=target, mac_weight=3.0, mac_eps=eps)
        got = train.sparsity_penalty(trace, recipe, ramp=0.5)
        want = 0.5 * 3.0 * max(0.0, mean / target - 1) ** 2
        assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-9)
    over = dataclasses.replace(TINY, mac_target=mean / 1.2, mac_weight=3.0, mac_eps=eps)
    train.sparsity_penalty(trace, over).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if train.GATE_MARK in n)


def test_a_straight_through_hinge_counts_the_macs_spent_and_pulls_every_open_gate():
    torch.manual_seed(0)
    model = models.create("lcnet_resnet8")            # training mode: leaky gates
    for gate in (m for n, m in model.named_modules() if n.endswith("_gate.fc")):
        torch.nn.init.normal_(gate.weight, std=0.5)
    closed = [m for n, m in model.named_modules() if n.endswith("block_gate.fc")][1]
    torch.nn.init.constant_(closed.bias, -3.0)
    trace = model(torch.randn(4, 3, 32, 32)).trace
    for s in [trace.block_scores, *trace.channel_scores]:
        s.retain_grad()
    spent = trace.macs.double().mean().item()          # held to torch's FLOP counter elsewhere
    target = spent / 1.25
    recipe = dataclasses.replace(TINY, mac_target=target, mac_weight=3.0,
                                 mac_straight_through=True)
    got = train.sparsity_penalty(trace, recipe, ramp=0.5)
    assert got.item() == pytest.approx(0.5 * 3.0 * (spent / target - 1) ** 2, rel=1e-5)
    got.backward()
    # by hand: d/dS_L,i of the scores' count is (branch + per_channel·Σ_c max(0, S_C)) / B
    # for S_L > 0 and 0 below, times the hinge's slope 2·ramp·μ·(spent/T − 1)/T
    slope = 2 * 0.5 * 3.0 * (spent / target - 1) / target
    costs = trace.cost.blocks
    for i in range(4):
        for k, b in enumerate(costs):
            s = float(trace.block_scores[i, k])
            channels = float(torch.relu(trace.channel_scores[k][i]).sum())
            want = slope * (b.branch + b.per_channel * channels) / 4 if s > 0 else 0.0
            assert float(trace.block_scores.grad[i, k]) == pytest.approx(want, rel=1e-4,
                                                                         abs=1e-12)
    assert (trace.block_scores[:, 1] < 0).all()        # the closed gate: no pull at all
    assert (trace.block_scores[:, 0] > 0.05).all()     # an open gate beyond ε is pulled
    assert (trace.block_scores.grad[:, 0] > 0).all()
    under = dataclasses.replace(recipe, mac_target=spent * 1.1)
    assert train.sparsity_penalty(trace, under).item() == 0


def test_negative_leaky_scores_are_pulled_to_zero_by_their_own_l1_term():
    model = models.create("lcnet_resnet8")         # training mode: leaky gates
    closed = [m for n, m in model.named_modules() if n.endswith("block_gate.fc")][1]
    torch.nn.init.constant_(closed.bias, -3.0)     # weight 0 (the init): S_L = 0.05·(−3)
    trace = model(torch.randn(4, 3, 32, 32)).trace
    # by hand: the mean of max(0, −s) over images × blocks, plus over images × channels
    blocks = [max(0.0, -float(v)) for v in trace.block_scores.flatten()]
    channels = [max(0.0, -float(v)) for c in trace.channel_scores for v in c.flatten()]
    want = 0.5 * (sum(blocks) / len(blocks) + sum(channels) / len(channels))
    recipe = dataclasses.replace(TINY, neg_l1=0.5)
    assert want > 0
    for ramp in (0.0, 1.0):                        # not scaled by the hinge's ramp
        got = train.sparsity_penalty(trace, recipe, ramp)
        assert got.item() == pytest.approx(want, rel=1e-5)
    train.sparsity_penalty(trace, recipe).backward()
    assert closed.bias.grad.item() < 0             # descent raises the closed gate to 0


def test_a_mac_budget_pulls_only_batches_that_spend_more():
    model = models.create("lcnet_resnet8")
    for gate in (m for n, m in model.named_modules() if n.endswith("_gate.fc")):
        torch.nn.init.normal_(gate.weight, std=0.5)
    trace = model(torch.randn(4, 3, 32, 32)).trace
    spent = trace.macs.double().mean().item()      # held to torch's FLOP counter elsewhere
    assert spent < model.macs()                     # some gates are off: a real mean
    pull = dataclasses.replace(TINY, l1_block=0.3, l1_channel=0.7)
    over = dataclasses.replace(pull, mac_budget=spent - 1)
    within = dataclasses.replace(pull, mac_budget=spent + 1)
    assert torch.equal(train.sparsity_penalty(trace, over), train.sparsity_penalty(trace, pull))
    assert train.sparsity_penalty(trace, within).item() == 0.0


def test_distillation_loss_is_its_formula_image_by_image():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 3, 5) * 3, torch.tensor([0, 4, 2, 2])
    w, t, smoothing = 0.6, 2.5, 0.1
    terms = []
    for i in range(4):
        teacher = [math.exp(v / t) for v in logits[i, -1].tolist()]
        teacher = [p / sum(teacher) for p in teacher]
        for k in range(3):
            z = logits[i, k].tolist()
            log_z = math.log(sum(math.exp(v) for v in z))
            # label smoothing: (1 − ε)·(−log p_y) + ε·mean over classes of −log p_c
            ce = (1 - smoothing) * (log_z - z[y[i]]) + smoothing * sum(log_z - v for v in z) / 5
            if k == 2:
                terms.append(ce)
                continue
            soft_z = math.log(sum(math.exp(v / t) for v in z))
            kl = sum(p * (math.log(p) - (v / t - soft_z)) for p, v in zip(teacher, z))
            terms.append((1 - w) * ce + w * t * t * kl)
    got = train.classification_loss(logits, y, smoothing, distill=w, temperature=t)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    plain = train.classification_loss(logits, y, smoothing)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), y.repeat_interleave(3), label_smoothing=smoothing).item(), rel=1e-6)


def test_distillation_does_not_train_the_teacher():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    teacher_only = train.classification_loss(logits, torch.tensor([1, 2]), 0.0, distill=1.0)
    teacher_only.backward()
    # with w = 1 the last exit's only term is its own CE; the early exits' KL sends it nothing
    ce_grad = torch.autograd.grad(torch.nn.functional.cross_entropy(
        logits[:, -1], torch.tensor([1, 2]), reduction="sum") / 6, logits)[0]
    assert torch.allclose(logits.grad[:, -1], ce_grad[:, -1], atol=1e-6)


def test_distillation_from_a_teacher_is_its_formula_image_by_image():
    torch.manual_seed(1)
    logits, teacher = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    y, smoothing, w, t = torch.tensor([0, 3, 4, 1]), 0.1, 0.7, 3.0
    terms = []
    for i in range(4):
        z, zt = logits[i].tolist(), teacher[i].tolist()
        log_z = math.log(sum(math.exp(v) for v in z))
        ce = (1 - smoothing) * (log_z - z[y[i]]) + smoothing * sum(log_z - v for v in z) / 5
        soft_z = math.log(sum(math.exp(v / t) for v in z))
        soft_t = math.log(sum(math.exp(v / t) for v in zt))
        p_t = [math.exp(v / t - soft_t) for v in zt]
        kl = sum(p * (math.log(p) - (v / t - soft_z)) for p, v in zip(p_t, z))
        terms.append((1 - w) * ce + w * t * t * kl)
    got = train.classification_loss(logits, y, smoothing, w, t, teacher=teacher)
    assert got.item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    # the teacher is a constant: a teacher that requires grad receives none
    teacher.requires_grad_(True)
    train.classification_loss(logits, y, smoothing, w, t, teacher=teacher).backward()
    assert teacher.grad is None and logits.grad is not None


def test_the_teacher_is_the_frozen_checkpoint_in_eval_mode(tws, monkeypatch):
    _into_zoo(tws, "base", dataclasses.replace(TINY, epochs=1), limit_batches=2)
    seen_x, seen_teacher = [], []
    real_batches, real_loss = train.data.batches, train.classification_loss

    def recording_batches(*args, **kwargs):
        for x, y in real_batches(*args, **kwargs):
            seen_x.append(x.clone())
            yield x, y

    def recording_loss(*args, **kwargs):
        seen_teacher.append(args[5].clone())
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train.data, "batches", recording_batches)
    monkeypatch.setattr(train, "classification_loss", recording_loss)
    student = dataclasses.replace(TINY, epochs=1, model="resnet20", teacher="base",
                                  distill=0.5)
    with pytest.raises(FileNotFoundError, match="train absent first"):
        train.fit(tws, "kd", dataclasses.replace(student, teacher="absent"), limit_batches=2,
                  progress=False)
    train.fit(tws, "kd", student, limit_batches=2, progress=False)
    reference = models.create("resnet8")
    reference.load_state_dict(torch.load(tws.checkpoints / "base.pt",
                                         weights_only=True))
    reference.eval()
    assert len(seen_teacher) == 2
    with torch.no_grad():
        for x, target in zip(seen_x, seen_teacher):
            torch.testing.assert_close(target, reference(x).logits, rtol=1e-4, atol=1e-5)


def test_resume_refuses_a_run_whose_teacher_was_retrained(tws):
    base = dataclasses.replace(TINY, epochs=1)
    _into_zoo(tws, "base", base, limit_batches=1)
    student = dataclasses.replace(TINY, epochs=2, teacher="base", distill=0.5)
    train.fit(tws, "student", student, epochs=1, limit_batches=1, progress=False)  # interrupted
    train.fit(tws, "student", student, epochs=1, resume=True, limit_batches=1, progress=False)
    _into_zoo(tws, "base", dataclasses.replace(base, seed=1), limit_batches=1)
    with pytest.raises(ValueError, match="learned from another base.pt"):
        train.fit(tws, "student", student, epochs=1, resume=True, limit_batches=1, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_ranks_hold_identical_weights(train_env, tws):
    """Two CPU processes under torchrun (gloo) train a few steps on different shards."""
    out = train_env / "ranks"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(settings.PROJECT_ROOT))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                    str(Path(__file__).with_name("ddp_worker.py")), str(out)],
                   env=env, check=True, timeout=300, cwd=settings.PROJECT_ROOT)
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert _same_weights(rank0, rank1)
    torch.manual_seed(TINY.seed)        # the initial weights both ranks started from
    initial = models.create("resnet8").state_dict()
    assert not torch.equal(rank0["fc.weight"], initial["fc.weight"])
    last = torch.load(tws.cache / "runs" / "ddp-test" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and _same_weights(last["model"], rank0)   # rank 0 wrote it


@pytest.mark.slow
def test_an_early_exit_network_trains_and_reports_every_exit(tws):
    recipe = Recipe("exits_resnet20", epochs=1, batch_size=16, bf16=False)
    manifest = train.train(tws, "exits-tiny", recipe, limit_batches=1, progress=False)
    n_exits = models.create("exits_resnet20").n_stages
    assert len(manifest["history"][0]["val_accuracy"]) == n_exits
    assert len(manifest["metrics"]["check"]["accuracy"]) == n_exits


def test_frozen_gates_keep_their_weights_while_the_backbone_trains(tws):
    start = dataclasses.replace(TINY, model="lcnet_resnet20", epochs=1)
    _into_zoo(tws, "gated", start, limit_batches=1)
    before = torch.load(tws.checkpoints / "gated.pt", weights_only=True)
    frozen = dataclasses.replace(start, init_from="gated", freeze_gates=True)
    after = train.fit(tws, "frozen", frozen, limit_batches=2, progress=False).model.state_dict()
    gates = [k for k in before if train.GATE_MARK in k]
    weights = [k for k in before if train.GATE_MARK not in k and k.endswith("conv1.weight")]
    assert gates and weights
    assert all(torch.equal(before[k], after[k].cpu()) for k in gates)
    assert not all(torch.equal(before[k], after[k].cpu()) for k in weights)


def test_the_mac_pull_waits_mac_delay_epochs_then_rises_over_mac_ramp(tws, monkeypatch):
    seen = []
    real = train.sparsity_penalty
    monkeypatch.setattr(train, "sparsity_penalty",
                        lambda trace, recipe, ramp=1.0: seen.append(ramp) or real(trace, recipe,
                                                                                  ramp))
    recipe = dataclasses.replace(TINY, model="lcnet_resnet20", epochs=4, mac_target=1e6,
                                 mac_weight=1.0, mac_delay=1, mac_ramp=2)
    train.fit(tws, "delayed", recipe, limit_batches=2, progress=False)
    # by hand: step s of epoch e is at e + s/2 epochs; 0 before epoch 1, then (t − 1)/2 ≤ 1
    want = [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert seen == pytest.approx(want)
    assert [recipe.pull(t) for t in (0.99, 1, 2, 3, 9)] == [0, 0, 0.5, 1, 1]
    assert dataclasses.replace(recipe, mac_ramp=0).pull(0.5) == 0
    assert dataclasses.replace(recipe, mac_ramp=0).pull(1) == 1


# ---------------------------------------------------------------------------- own workspace
KIWI_CLASSES = ("kiwi", "emu", "moa")

# a workspace of one's own, with a recipe of its own
OWN_WORKSPACE = workspace_toml(
    KIWI_CLASSES, 40, {"small": {"kind": "static", "model": "resnet8", "checkpoint": "resnet8"}},
    reference="small", extra="""
# the built-in resnet8, in batches this small dataset fills
[recipes.resnet8]
base = "resnet8"
batch_size = 16
bf16 = false
""")


@pytest.fixture
def own_workspace(tmp_path, monkeypatch):
    """A workspace of one's own: 3 bird classes of 25 images, 40 pixels a side."""
    monkeypatch.setenv("DYNVIZ_DEVICE", "cpu")
    monkeypatch.delenv("DYNVIZ_WORKSPACE", raising=False)
    root = tmp_path / "birds"
    make_imagefolder(root / "images", per_class=25, size=40, classes=KIWI_CLASSES)
    (root / workspace.FILE).write_text(OWN_WORKSPACE)
    return root


def test_a_workspace_of_ones_own_trains_into_its_checkpoints(own_workspace, monkeypatch,
                                                             capsys):
    argv = ["--workspace", str(own_workspace), "train", "resnet8", "--epochs", "1",
            "--limit-batches", "1"]
    assert main(argv) == 0
    weights = own_workspace / "checkpoints" / "resnet8.pt"     # where its systems load
    manifest = json.loads(weights.with_suffix(".json").read_text())
    state = torch.load(weights, weights_only=True)
    assert state["fc.weight"].shape[0] == 3                     # one output per bird
    assert manifest["classes"] == list(KIWI_CLASSES) and manifest["image_size"] == 40
    assert manifest["recipe"]["batch_size"] == 16               # the workspace's recipe
    # the costs are those of a 40x40 image, counted by torch on the trained weights
    model = models.create("resnet8", num_classes=3, input_size=40).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        counted = flops_macs(lambda: model(torch.randn(1, 3, 40, 40)))
    assert counted != models.create("resnet8", num_classes=3).macs()   # 32 pixels: fewer
    assert manifest["macs_dense"] == counted
    assert manifest["history"][0]["val_macs"] == counted
    assert (own_workspace / ".cache" / "runs" / "resnet8" / "last.pt").exists()
    capsys.readouterr()

    def training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "fit", training)
    before = weights.read_bytes()
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {weights} exists") and "--replace" in line
    assert weights.read_bytes() == before
    with pytest.raises(AssertionError, match="training started"):
        main([*argv, "--replace"])


def test_a_gated_recipe_starts_from_torchvision_resnet18_weights(own_workspace):
    """A workspace's recipe: LC-Net's gates on a ResNet-18 someone trained with torchvision
    (its state dict, saved as a checkpoint of the workspace)."""
    import torchvision

    (own_workspace / workspace.FILE).write_text(OWN_WORKSPACE + """
[recipes.gated18]
base = "lcnet_resnet56"
model = "lcnet_resnet18"
init_from = "their_resnet18"
epochs = 1
batch_size = 16
bf16 = false
trainable = "fc."       # only the classifier moves: the rest must be their weights
""")
    ws = workspace.load(own_workspace)
    recipe = recipes.for_workspace(ws)["gated18"]
    with pytest.raises(FileNotFoundError, match="their_resnet18.pt .* is missing: train "
                                                "their_resnet18 first"):
        train.fit(ws, "gated18", recipe, limit_batches=1, progress=False)
    theirs = torchvision.models.resnet18(num_classes=3).state_dict()
    ws.checkpoints.mkdir()
    torch.save(theirs, ws.checkpoints / "their_resnet18.pt")
    run = train.fit(ws, "gated18", recipe, limit_batches=1, progress=False)
    ours = run.model.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer3.0.downsample.0.weight",
                "layer2.0.bn1.running_var"):
        assert torch.equal(ours[key].cpu(), theirs[key]), key
    assert not torch.equal(ours["fc.weight"].cpu(), theirs["fc.weight"])   # it trained


def test_a_dataset_smaller_than_a_batch_says_so(own_workspace):
    ws = workspace.load(own_workspace)
    # 3 classes of 25 images, 3 of each (10%, halves up) held out: 66 train images
    with pytest.raises(ValueError, match="66 training images make no batch of 128"):
        train.fit(ws, "resnet8", RECIPES["resnet8"], limit_batches=1, progress=False)


def test_a_channel_price_counts_an_off_channel_as_partly_spent():
    """With channel price w the straight-through count is, per image, w·(the MACs spent) +
    (1 − w)·(the MACs spent had every channel of the blocks that ran been on): a skipped
    block still saves all of its MACs. Both references are the trace's own cost model on 0/1
    decisions, at w = 1 the MACs spent."""
    torch.manual_seed(1)
    model = models.create("lcnet_resnet8")
    for name, gate in model.named_modules():
        if name.endswith("_gate.fc"):              # channels half on, one block skipped
            torch.nn.init.normal_(gate.weight, std=0.5)
            torch.nn.init.constant_(gate.bias, -3.0 if name == "layer2.0.block_gate.fc" else 0)
    trace = model(torch.randn(6, 3, 32, 32)).trace
    ran = trace.block_scores > 0
    assert ran.any() and (~ran).any() and any((c <= 0).any() for c in trace.channel_scores)
    spent = trace.cost.macs(ran, [c > 0 for c in trace.channel_scores]).double()
    all_on = trace.cost.macs(ran, [torch.ones_like(c) for c in trace.channel_scores]).double()
    target = float(spent.mean()) / 2
    for w in (1.0, 0.5, 0.2):
        recipe = dataclasses.replace(TINY, mac_target=target, mac_weight=1.0,
                                     mac_straight_through=True, channel_price=w)
        counted = float((w * spent + (1 - w) * all_on).mean())
        got = train.sparsity_penalty(trace, recipe)
        assert got.item() == pytest.approx((counted / target - 1) ** 2, rel=1e-5)
