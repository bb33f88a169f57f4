"""The optimizer: an optax chain over the trainable tree only (LoRA factors, or all weights).

    clip_by_global_norm(clip_norm) -> adamw(schedule, b1, b2, eps, weight_decay)
                                    | add_decayed_weights(weight_decay) -> sgd(schedule, momentum)

The schedule is a linear warmup from 0 to `lr` over `warmup_steps`, then `cosine` (to 0 at
`total_steps`), `linear` (to 0 at `total_steps`) or `constant`. It is indexed by the number of
*applied* updates (optax's own count), so a skipped non-finite step does not advance it. The frozen
base never reaches this module: it has no optimizer state at all.
"""

from __future__ import annotations

import optax

from flacuna_jax.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the update count: warmup, then the chosen decay."""
    warmup = max(int(cfg.warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=0.0)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r} (cosine, linear, constant)")
    if warmup == 0:
        return after
    # Step 0 gets lr/warmup rather than 0, so the very first update already moves the weights.
    ramp = optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup - 1) if warmup > 1 else optax.constant_schedule(cfg.lr)
    return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, its schedule) for `cfg`; gradients are clipped before the update."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    elif cfg.name == "sgd":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
    else:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (adamw, sgd)")
    return optax.chain(*parts), schedule
