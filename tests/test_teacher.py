import copy

import pytest
import torch
from torch import nn

from sparse_semi_detr_hf.training.teacher import EMATeacher, ema_momentum, scaled_momentum, unwrap_model


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel / accelerate wrappers: the model sits at ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def _perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator))


def _assert_averaged(teacher: EMATeacher, before: list, student: nn.Module, momentum: float) -> None:
    """Every teacher parameter is ``momentum * before + (1 - momentum) * student``."""
    for t, b, s in zip(teacher.model.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, momentum * b + (1 - momentum) * s)


@pytest.fixture
def student():
    torch.manual_seed(0)
    return TinyNet()


def test_momentum_schedule():
    assert ema_momentum(0, 0.999) == 0.0
    assert ema_momentum(1, 0.999) == 0.5
    assert ema_momentum(3, 0.999) == pytest.approx(0.75)
    assert ema_momentum(10_000, 0.999) == 0.999
    assert ema_momentum(999, 0.999) == pytest.approx(0.999)
    with pytest.raises(ValueError):
        ema_momentum(-1, 0.999)


def test_momentum_without_warmup_is_constant():
    assert ema_momentum(0, 0.995, warmup=False) == 0.995
    assert ema_momentum(1, 0.995, warmup=False) == 0.995
    assert ema_momentum(10_000, 0.995, warmup=False) == 0.995


def test_a_trained_teacher_is_not_replaced_by_the_first_student_step(student):
    """Regression: starting the semi-supervised phase from a burn-in model, the warm-up (m = 0.5 at the first
    update) mixed the student's first noisy steps into the teacher and threw the burn-in teacher away (the
    pseudo-labels per unlabeled image fell from 3.3 to 0.08-0.28 in 250 steps, benchmarks/results/EARLIER_STUDIES.md).
    Without warm-up every update, the first included, uses m_max."""
    teacher = EMATeacher(student, momentum_max=0.99, warmup=False)
    before = [p.clone() for p in teacher.model.parameters()]
    _perturb(student, 1)
    assert teacher.update(student, step=0) == 0.99
    _assert_averaged(teacher, before, student, 0.99)


def test_state_dict_keeps_the_warmup_setting(student):
    saved = EMATeacher(student, momentum_max=0.99, warmup=False).state_dict()
    restored = EMATeacher(copy.deepcopy(student), momentum_max=0.5)
    restored.load_state_dict(saved)
    assert restored.warmup is False and restored.momentum_max == 0.99


def test_scaled_momentum_keeps_horizon_in_images():
    assert scaled_momentum(0.999, 40, 40) == pytest.approx(0.999)
    small = scaled_momentum(0.999, 40, 5)
    assert small > 0.999
    # 8 steps of 5 images decay the old teacher as much as 1 step of 40 images.
    assert small**8 == pytest.approx(0.999)
    assert scaled_momentum(0.99, 8, 16) == pytest.approx(0.99**2)


def test_teacher_is_frozen_eval_copy(student):
    student.train()
    teacher = EMATeacher(student)
    assert teacher.model is not student
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (name, t), s in zip(teacher.model.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(t, s, msg=name)


def test_step0_copies_step1_averages(student):
    teacher = EMATeacher(student)
    _perturb(student, 1)
    assert teacher.update(student, step=0) == 0.0
    for t, s in zip(teacher.model.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    before = [p.clone() for p in teacher.model.parameters()]
    _perturb(student, 2)
    assert teacher.update(student, step=1) == 0.5
    _assert_averaged(teacher, before, student, 0.5)


def test_update_matches_hand_computation_and_copies_buffers(student):
    teacher = EMATeacher(student, momentum_max=0.9)
    before = {k: v.clone() for k, v in teacher.model.named_parameters()}
    _perturb(student, 3)
    student.train()
    student(torch.randn(2, 3, 6, 6))  # moves the student's BN running statistics
    momentum = teacher.update(student, step=50)
    assert momentum == 0.9
    for name, param in teacher.model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(param, expected, msg=name)
    torch.testing.assert_close(teacher.model.bn.running_mean, student.bn.running_mean)
    torch.testing.assert_close(teacher.model.bn.running_var, student.bn.running_var)
    assert teacher.model.bn.num_batches_tracked.item() == student.bn.num_batches_tracked.item() == 1
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())


def test_teacher_forward_has_no_grad_and_eval_even_if_student_trains(student):
    teacher = EMATeacher(student)
    student.train()
    teacher.update(Wrapper(student), step=5)
    out = teacher(torch.randn(1, 3, 5, 5))
    assert not out.requires_grad
    assert not teacher.model.training
    teacher.model.train()
    teacher.update(student, step=6)
    assert not teacher.model.training


def test_wrapped_student(student):
    wrapped = Wrapper(Wrapper(student))
    assert unwrap_model(wrapped) is student
    teacher = EMATeacher(wrapped)
    assert isinstance(teacher.model, TinyNet)
    _perturb(student, 4)
    teacher.update(wrapped, step=0)
    for t, s in zip(teacher.model.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def test_architecture_mismatch_raises(student):
    teacher = EMATeacher(student)
    with pytest.raises(ValueError, match="names differ"):
        teacher.update(nn.Linear(2, 2), step=1)


def test_state_dict_round_trip(student, tmp_path):
    teacher = EMATeacher(student, momentum_max=0.99)
    _perturb(student, 5)
    teacher.update(student, step=1)
    path = tmp_path / "teacher.pkl"
    torch.save(teacher.state_dict(), path)

    other = EMATeacher(copy.deepcopy(student), momentum_max=0.5)
    other.model.train()
    other.load_state_dict(torch.load(path, weights_only=False))
    assert other.momentum_max == 0.99
    assert other.last_momentum == 0.5
    assert not other.model.training
    assert all(not p.requires_grad for p in other.model.parameters())
    for (name, a), b in zip(teacher.model.state_dict().items(), other.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_to_returns_self_and_moves_dtype(student):
    teacher = EMATeacher(student)
    assert teacher.to(torch.float64) is teacher
    assert teacher.model.conv.weight.dtype == torch.float64
    _perturb(student, 6)
    teacher.update(student, step=0)  # student float32 tensors are cast to the teacher's dtype
    torch.testing.assert_close(teacher.model.conv.weight, student.conv.weight.double())


def test_accelerate_checkpointing_round_trip(student, tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    teacher = EMATeacher(student, momentum_max=0.99)
    accelerator.register_for_checkpointing(teacher)
    _perturb(student, 7)
    teacher.update(student, step=3)
    saved = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    accelerator.save_state(str(tmp_path / "ckpt"))
    _perturb(student, 8)
    teacher.update(student, step=0)
    teacher.momentum_max = 0.5
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert teacher.momentum_max == 0.99 and teacher.last_momentum == 0.75
    for name, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
