"""Recovery by knowledge distillation: the pruned student learns the unpruned teacher's next-token distribution."""
from __future__ import annotations

import math

from ..errors import CompressError
from .config import Recover


def _lr_at(step: int, cfg: Recover) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """KL(teacher || student) per token, times T^2. logits: [B, S, V]."""
    import torch.nn.functional as F

    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, 1)  # [B*S, V]
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, 1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def distill_(student, teacher, windows, cfg: Recover, masks: dict | None = None, progress: bool = False) -> dict:
    """Train ``student`` in place for ``cfg.steps`` steps on ``windows`` (list of [1, S] int64 tensors).

    Only decoder-layer parameters and the final norm train (embeddings / tied lm_head stay frozen).
    ``masks`` {module name: keep-mask} keeps pruned weights at zero. Returns {"loss_first", "loss_last"}.
    """
    import torch

    if not windows:
        raise CompressError("recovery needs calibration windows")
    params = [p for n, p in student.named_parameters() if "embed_tokens" not in n and not n.startswith("lm_head")]
    mods = dict(student.named_modules())
    pinned = [(mods[n].weight, k) for n, k in (masks or {}).items()]
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    for n, p in student.named_parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    was_training = student.training
    student.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    bar = None
    if progress:
        from runtime.progress import bar as make_bar

        bar = make_bar(cfg.steps, "recovering (distillation)")
    losses = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for step in range(cfg.steps):
                if not order:
                    order = torch.randperm(len(windows), generator=gen).tolist()
                x = windows[order.pop()]  # [1, S]
                with torch.no_grad():
                    t_logits = teacher(input_ids=x, use_cache=False).logits
                s_logits = student(input_ids=x, use_cache=False).logits
                loss = kd_loss(s_logits, t_logits, cfg.temperature)
                if not torch.isfinite(loss):
                    raise CompressError(f"distillation diverged at step {step} (loss {float(loss)}); "
                                        "lower --recover-lr")
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                with torch.no_grad():
                    for w, keep in pinned:
                        w.mul_(keep)
                losses.append(float(loss.detach()))
                if bar:
                    bar.advance()
    finally:
        if bar:
            bar.close()
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
        student.train(was_training)
        opt.zero_grad(set_to_none=True)
    k = max(1, min(8, len(losses) // 4))
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "steps": cfg.steps}
