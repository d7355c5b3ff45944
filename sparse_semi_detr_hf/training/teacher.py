"""Exponential-moving-average (mean) teacher of the semi-supervised loop (SPEC §2).

The teacher is a frozen deep copy of the student whose parameters follow the student's as an EMA:

    m_step = min(momentum_max, 1 - 1 / (step + 1))
    teacher_param <- m_step * teacher_param + (1 - m_step) * student_param

so the teacher is an exact copy at step 0, the plain average of two models at step 1, and reaches
``momentum_max`` after about ``1 / (1 - momentum_max)`` steps (Semi-DETR's ``MeanTeacher`` hook). That warm-up
suits a teacher that starts untrained (Semi-DETR starts from ImageNet weights, no burn-in). A teacher that starts
as a trained model (a supervised burn-in) must not be replaced by the student's first, noisy steps: with
``warmup=False`` the momentum is ``momentum_max`` from step 0 (Unbiased Teacher's constant EMA after burn-in).

Buffers (BatchNorm running statistics, ``num_batches_tracked``) are **copied** from the student, not
averaged: frozen-BN buffers are constant anyway, and trainable-BN running statistics of the teacher
should describe the activations of the weights it holds, which track the student's closely. (Semi-DETR
leaves buffers alone because its backbone BN is frozen; copying is equivalent there.)
"""

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel``/accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        return module


def ema_momentum(step: int, momentum_max: float, warmup: bool = True) -> float:
    """EMA momentum at ``step`` (0-based): ``min(momentum_max, 1 - 1 / (step + 1))``; ``momentum_max`` without
    ``warmup``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(momentum_max, 1.0 - 1.0 / (step + 1)) if warmup else momentum_max


def scaled_momentum(base_momentum: float, base_batch: int, batch: int) -> float:
    """EMA momentum for a global batch of ``batch`` images, tuned at ``base_batch``: ``m ** (batch / base_batch)``.

    After ``N`` images the old teacher keeps a weight ``m ** (N / base_batch)`` under the base recipe. With
    batch ``b`` there are ``N / b`` updates, so ``m' ** (N / b)`` must equal it, i.e. ``m' = m ** (b / base_batch)``:
    the averaging horizon measured in images stays the same when the run uses fewer GPUs or smaller batches.
    Example: Semi-DETR's 0.999 at 40 images a step becomes ``0.999 ** (5 / 40) ≈ 0.999875`` at 5 images a step.
    """
    if not 0.0 <= base_momentum < 1.0:
        raise ValueError(f"base_momentum must be in [0, 1), got {base_momentum}")
    if base_batch <= 0 or batch <= 0:
        raise ValueError(f"batch sizes must be positive, got base_batch={base_batch}, batch={batch}")
    return base_momentum ** (batch / base_batch)


class EMATeacher:
    """Mean teacher: a frozen, always-eval EMA copy of the student.

    Args:
        student: the student model (may be wrapped by DDP/accelerate; it is unwrapped before copying).
        momentum_max: the ceiling of the momentum schedule (0.999 by default, Semi-DETR's value).
        warmup: the ``1 - 1 / (step + 1)`` warm-up (for an untrained start); ``False``: constant ``momentum_max``.

    The object has ``state_dict()``/``load_state_dict()``, so ``accelerator.register_for_checkpointing(teacher)``
    saves and restores it (the teacher weights plus the momentum settings). Use ``teacher.model`` for forwards.
    """

    def __init__(self, student: nn.Module, momentum_max: float = 0.999, warmup: bool = True):
        if not 0.0 <= momentum_max <= 1.0:
            raise ValueError(f"momentum_max must be in [0, 1], got {momentum_max}")
        self.momentum_max = float(momentum_max)
        self.warmup = bool(warmup)
        self.last_momentum: float | None = None
        self.model = copy.deepcopy(unwrap_model(student))
        self.model.requires_grad_(False)
        for param in self.model.parameters():
            param.grad = None
        self.model.eval()

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Average the student into the teacher with the momentum of ``step``; returns that momentum.

        Parameters: ``teacher <- m * teacher + (1 - m) * student`` (one fused ``_foreach_lerp_``).
        Buffers: copied from the student. Student tensors are moved to the teacher's device/dtype if they differ.
        """
        momentum = ema_momentum(step, self.momentum_max, self.warmup)
        student = unwrap_model(student)
        teacher_params, student_params = self._paired(
            dict(self.model.named_parameters()), dict(student.named_parameters()), "parameter"
        )
        if teacher_params:
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
        teacher_buffers, student_buffers = self._paired(
            dict(self.model.named_buffers()), dict(student.named_buffers()), "buffer"
        )
        for teacher_buffer, student_buffer in zip(teacher_buffers, student_buffers):
            teacher_buffer.copy_(student_buffer)
        if self.model.training:
            self.model.eval()
        self.last_momentum = momentum
        return momentum

    @torch.no_grad()
    def restore_buffers(self, student: nn.Module) -> None:
        """Copy the teacher's buffers (the student's as of the last update) back into ``student``: undoes what a
        skipped step's forward pass did to BatchNorm statistics."""
        student_buffers, teacher_buffers = self._paired(
            dict(unwrap_model(student).named_buffers()), dict(self.model.named_buffers()), "buffer"
        )
        for student_buffer, teacher_buffer in zip(student_buffers, teacher_buffers):
            student_buffer.copy_(teacher_buffer)

    @staticmethod
    def _paired(
        teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], kind: str
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Align student tensors to teacher tensors by name; a name mismatch means a different architecture."""
        if teacher.keys() != student.keys():
            missing = sorted(set(teacher) ^ set(student))[:5]
            raise ValueError(f"teacher and student {kind} names differ, e.g. {missing}")
        teacher_list = list(teacher.values())
        student_list = [
            student[name].detach().to(device=tensor.device, dtype=tensor.dtype) for name, tensor in teacher.items()
        ]
        return teacher_list, student_list

    def state_dict(self) -> dict[str, Any]:
        """``{"model": teacher state dict, "momentum_max": float, "warmup": bool, "last_momentum": float | None}``."""
        return {
            "model": self.model.state_dict(),
            "momentum_max": self.momentum_max,
            "warmup": self.warmup,
            "last_momentum": self.last_momentum,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; the teacher stays frozen and in eval mode."""
        self.model.load_state_dict(state_dict["model"])
        self.momentum_max = float(state_dict.get("momentum_max", self.momentum_max))
        self.warmup = bool(state_dict.get("warmup", self.warmup))
        self.last_momentum = state_dict.get("last_momentum")
        self.model.requires_grad_(False)
        self.model.eval()

    def to(self, *args, **kwargs) -> "EMATeacher":
        """Move the teacher model (same arguments as ``nn.Module.to``); returns ``self``."""
        self.model.to(*args, **kwargs)
        return self

    def __call__(self, *args, **kwargs):
        """Forward of the teacher model in no-grad mode."""
        with torch.no_grad():
            return self.model(*args, **kwargs)
