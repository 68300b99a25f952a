"""Training losses: cross-entropy with distillation (single networks and staged ones), and
LC-Net's sparsity terms."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dynviz.recipes import Recipe


def classification_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float,
                        distill: float = 0.0, temperature: float = 1.0,
                        teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy; for staged models (B, K, C) the mean over images and the K exits
    (K = 1 is a single network's (B, C)).

    With ``distill`` = w > 0 a student learns from a teacher too (Hinton et al.'s
    distillation): its term is (1 − w)·CE + w·T²·KL(p_teacher ‖ p_student), p at temperature
    T. The teacher is ``teacher`` (B, C) logits of another model, for a (B, C) student;
    in a staged model without one, every exit but the last learns from the last exit.
    """
    logits = logits.float()
    if logits.ndim == 3 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim == 2:
        ce = F.cross_entropy(logits, y, label_smoothing=smoothing, reduction="none")
        if teacher is None or not distill:
            return ce.mean()
        kd = _distillation(logits, teacher.float(), temperature)
        return ((1 - distill) * ce + distill * kd).mean()
    if teacher is not None:
        raise ValueError("staged models learn from their final exit, not from a teacher")
    b, k, _ = logits.shape
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(k),
                         label_smoothing=smoothing, reduction="none").view(b, k)
    if not distill or k == 1:
        return ce.mean()
    kd = _distillation(logits[:, :-1], logits[:, -1:], temperature)         # (B, K-1)
    early = (1 - distill) * ce[:, :-1] + distill * kd
    return torch.cat([early, ce[:, -1:]], 1).mean()


def _distillation(student: torch.Tensor, teacher: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """T²·KL(p_teacher ‖ p_student) over the last dim; the teacher is a constant."""
    t = F.log_softmax(teacher.detach() / temperature, -1)
    s = F.log_softmax(student / temperature, -1)
    return temperature ** 2 * (t.exp() * (t - s)).sum(-1)


def _eps_macs(trace, eps: float) -> torch.Tensor:
    """The batch's mean MACs counting a score s as min(1, max(0, s)/ε)."""
    def on(scores: torch.Tensor) -> torch.Tensor:      # 0 at s ≤ 0, 1 at s ≥ ε
        return torch.clamp(scores / eps, 0, 1)

    return trace.cost.expected_macs(
        on(trace.block_scores), [on(c) for c in trace.channel_scores]).mean()


def _straight_through_macs(trace, channel_price: float = 1.0) -> torch.Tensor:
    """The batch's mean MACs as inference spends them, with the gradient of the same count
    over max(0, S). With ``channel_price`` w < 1 a channel that is off in a block that runs
    counts (1 − w) of its MACs still: w·(the count) + (1 − w)·(the count with every channel
    of those blocks on), a price on channels by what they save in time."""
    def priced(count, blocks: torch.Tensor, channels: list[torch.Tensor]) -> torch.Tensor:
        all_on = count(blocks, [torch.ones_like(c) for c in channels])
        return (channel_price * count(blocks, channels) + (1 - channel_price) * all_on).mean()

    spent = priced(trace.cost.macs, trace.block_scores > 0, [c > 0 for c in trace.channel_scores])
    scores = priced(trace.cost.expected_macs, torch.relu(trace.block_scores),
                    [torch.relu(c) for c in trace.channel_scores])
    return spent + (scores - scores.detach())


def sparsity_penalty(trace, recipe: Recipe, ramp: float = 1.0) -> torch.Tensor:
    """α·mean|S_L| + β·mean|S_C| over images, blocks and channels (LC-Net's L1 terms), plus
    ``ramp``·μ·max(0, E[MACs]/T − 1)², a squared hinge on the batch's mean MACs (T =
    ``mac_target``, μ = ``mac_weight``): it fades out smoothly at the target, as
    ConvNet-AIG's target-rate loss does (Veit & Belongie, ECCV 2018). E[MACs] counts a
    block or channel with score s as min(1, max(0, s)/ε) of it (ε = ``mac_eps``), as
    inference runs it: trained gates run blocks at small scores, so the scores themselves
    would count a fraction of the MACs spent. ``ramp`` in [0, 1] scales μ while it rises.

    With ``mac_straight_through`` E[MACs] is instead the MACs inference spends (S > 0 counts
    whole), its gradient that of the scores' own count, max(0, S) in place of the decisions
    (a straight-through estimator, Bengio et al. 2013): the hinge then sees the true cost and
    pulls every open gate in proportion to what it costs, not only those within ε of 0,
    which let trial 2b's MACs rise past the target (docs/lcnet.md).

    Plus ``neg_l1``·(mean relu(−S_L) + mean relu(−S_C)): a negative score of the
    training-time leaky gates still scales its block's output in training, and inference
    skips that block; without this term (or LC-Net's L1 terms, which charge |S|) the hinge
    let trial 2a compute with such blocks for free (docs/lcnet.md).

    With a ``mac_budget`` the L1 terms pull only while the batch's mean MACs exceed it, so
    that once the gates spend within the budget the rest of the run trains for accuracy alone.
    """
    penalty = trace.block_scores.new_zeros(())
    if recipe.mac_weight:
        expected = (_straight_through_macs(trace, recipe.channel_price)
                    if recipe.mac_straight_through else _eps_macs(trace, recipe.mac_eps))
        penalty = penalty + ramp * recipe.mac_weight * torch.relu(
            expected / recipe.mac_target - 1) ** 2
    if recipe.neg_l1:
        below = [torch.relu(-trace.block_scores).mean(),
                 torch.cat([torch.relu(-s).flatten(1) for s in trace.channel_scores], 1).mean()]
        penalty = penalty + recipe.neg_l1 * (below[0] + below[1])
    if recipe.mac_budget and trace.macs.float().mean() <= recipe.mac_budget:
        return penalty
    if recipe.l1_block or recipe.l1_channel:
        block = trace.block_scores.abs().mean()
        channel = torch.cat([s.abs().flatten(1) for s in trace.channel_scores], 1).mean()
        penalty = penalty + recipe.l1_block * block + recipe.l1_channel * channel
    return penalty
