"""Knowledge distillation on logits (Hinton et al. 2015; "Learning with Less": unlabeled domain text,
every token carrying the teacher's distribution instead of a one-hot label).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token)

per predicted token (T^2 keeps the KL term's gradients the size of CE's as T changes). The teacher runs
in eval mode without gradients, on the same windows as the student, inside the caller's autocast.
"""

from __future__ import annotations


def kd_loss(student_logits, teacher_logits, targets, alpha: float, temperature: float):
    """The distillation loss summed over the tokens of a batch ([B, T, V] logits, [B, T] targets)."""
    import torch.nn.functional as F

    s = student_logits.float().flatten(0, 1)
    loss = 0.0
    if alpha > 0:
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)
        loss = alpha * temperature ** 2 * F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, targets.flatten(), reduction="sum")
    return loss


class Distiller:
    """The loop's loss for a student of `teacher` (same vocabulary): `(logits, window) -> summed loss`."""

    def __init__(self, teacher, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher.eval(), alpha, temperature
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def teacher_logits(self, inputs):
        import torch

        with torch.no_grad():
            return self.teacher(input_ids=inputs.to(next(self.teacher.parameters()).device)).logits

    def __call__(self, logits, window):
        t = self.teacher_logits(window[:, :-1]) if self.alpha > 0 else None
        return kd_loss(logits, t, window[:, 1:], self.alpha, self.temperature)


def mean_kl(teacher, student, windows, micro_batch: int = 8) -> float:
    """Mean per-token KL(teacher || student) at temperature 1 on `windows` ([N, T] token ids)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    windows = torch.as_tensor(np.asarray(windows, dtype=np.int64))
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), micro_batch):
            x = windows[i:i + micro_batch]
            log_t = F.log_softmax(teacher(input_ids=x).logits.float(), dim=-1).flatten(0, 1)
            log_s = F.log_softmax(student(input_ids=x).logits.float(), dim=-1).flatten(0, 1)
            total += float(F.kl_div(log_s, log_t, log_target=True, reduction="sum"))
    return total / windows.numel()
