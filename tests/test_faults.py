"""Faults a user meets: a diverging run (NaN / inf loss) changes nothing, is counted, and stops with a clear
error; nothing non-finite is exported."""

import math

import pytest
import torch
from test_trainer import student_detector, tiny_args

from sparse_semi_detr_hf.training.trainer import DivergenceError, SemiSupervisedTrainer


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    """Student and teacher state (parameters and buffers) by name."""
    state = {f"student.{k}": v.clone() for k, v in student_detector(trainer).state_dict().items()}
    state.update({f"teacher.{k}": v.clone() for k, v in trainer.teacher.model.state_dict().items()})
    return state


def _poison_steps(trainer, steps: set[int], value: float = math.nan) -> None:
    """Multiply the loss of the given (0-based) steps by ``value``."""
    original = trainer.compute_loss

    def compute_loss(*args, **kwargs):
        loss, logs = original(*args, **kwargs)
        return (loss * value, logs) if trainer.state.step in steps else (loss, logs)

    trainer.compute_loss = compute_loss


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nonfinite_step_changes_nothing_and_training_goes_on(tmp_path, synthetic_cache, value):
    args = tiny_args(tmp_path, synthetic_cache, "--max_steps", "3", "--eval_steps", "100",
                     "--checkpointing_steps", "100", "--detection_picture_images", "0")
    trainer = SemiSupervisedTrainer(args)
    _poison_steps(trainer, {1}, value)
    labeled, unlabeled = (iter(loader) for loader in trainer._loaders())
    student_detector(trainer).train()
    trainer.optimizer_step([next(labeled)], [next(unlabeled)])  # step 0: a normal update
    before = _snapshot(trainer)
    logs = trainer.optimizer_step([next(labeled)], [next(unlabeled)])  # step 1: poisoned
    after = _snapshot(trainer)
    assert not math.isfinite(logs["grad_norm"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # no parameter, no BatchNorm statistic, no EMA change
    assert trainer.state.step == 2 and trainer.state.skipped_steps == [2] and trainer.state.nonfinite_in_a_row == 1
    logs = trainer.optimizer_step([next(labeled)], [next(unlabeled)])  # step 2: normal again
    assert math.isfinite(logs["grad_norm"]) and trainer.state.nonfinite_in_a_row == 0
    assert any(not torch.equal(after[k], v) for k, v in _snapshot(trainer).items())


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_nonfinite(tmp_path, synthetic_cache):
    args = tiny_args(tmp_path, synthetic_cache, "--max_steps", "20", "--eval_steps", "2",
                     "--checkpointing_steps", "2", "--max_nonfinite_steps", "3", "--detection_picture_images", "0")
    trainer = SemiSupervisedTrainer(args)
    _poison_steps(trainer, set(range(3, 20)))
    with pytest.raises(DivergenceError, match=r"3 steps in a row up to step 6.*--learning_rate"):
        trainer.train()
    assert trainer.state.skipped_steps == [4, 5, 6]
    for path in tmp_path.rglob("*.safetensors"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point()), path


def test_export_refuses_nonfinite_weights(tmp_path, synthetic_cache):
    trainer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--max_steps", "1"))
    model = trainer.teacher.model
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(ValueError, match="refusing to export"):
        trainer.export(model, "broken", dict.fromkeys(["AP"], 0.0))
    assert not (tmp_path / "broken").exists()


def test_the_learning_rate_and_gradient_norm_are_logged(tmp_path, synthetic_cache):
    trainer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--max_steps", "1",
                                              "--max_grad_norm", "0", "--detection_picture_images", "0"))
    results = trainer.train()
    assert {"lr", "grad_norm"} <= set(results["last_logged"]) and results["last_logged"]["grad_norm"] > 0
