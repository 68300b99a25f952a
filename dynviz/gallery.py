"""What the Galleries page shows, computed from a system's cached validation outputs: the cost
of every image under the system's default operating point (LC-Net Fig. 6 ranks images by
it), and per-class channel firing rates (Fig. 7), with the block where they differ most
between classes."""
from __future__ import annotations

import numpy as np

from dynviz import cache, learn, operating_points, policy as P
from dynviz.workspace import Workspace


def per_image_cost(ws: Workspace, name: str, cached: cache.CachedOutputs
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """(cost per image, prediction per image, reference cost) of system ``name`` of ``ws``:
    staged systems under their shipped ≤0.5%-loss policy (else one fit for half the cost),
    others as they ran."""
    out = cached.stage_outputs()
    spec = ws.spec(name)
    if spec.kind in ("exits", "cascade"):
        pol = operating_points.load_policy(ws, name, operating_points.LOSSES[0])
        if pol is None:
            pol = learn.target_budget(cached.half("fit"), 0.5, topology=spec.topology)
        sim = P.simulate(pol, out)
        return sim.cost, sim.predictions, out.reference_cost
    return out.stage_costs[:, 0], out.predictions[:, 0], float(out.stage_costs[:, 0].max())


def class_firing_rates(cached: cache.CachedOutputs, block: int, n_classes: int) -> np.ndarray:
    """(n_classes, C_mid): for each class, the share of its images for which each channel of
    ``block`` was computed (the block ran, S_L > 0, and the channel's S_C > 0); 0 for a class
    without images."""
    labels = cached.arrays["labels"].astype(int)
    ran = cached.blocks_run()[:, block, None] & cached.channels_on(block)
    return np.stack([ran[labels == c].mean(0) if (labels == c).any()
                     else np.zeros(ran.shape[1]) for c in range(n_classes)])


def most_class_specific_block(cached: cache.CachedOutputs, n_classes: int) -> int:
    """The block whose channel firing rates differ most between classes: the largest mean,
    over its channels, of the variance of the rate across classes. A block that never runs,
    or runs every channel for every image, scores 0 (trained gates skip some early blocks for
    almost every image, which makes the first block the least telling default)."""
    n_blocks = len(cached.manifest["block_names"])
    spread = [class_firing_rates(cached, b, n_classes).var(0).mean()
              for b in range(n_blocks)]
    return int(np.argmax(spread))
