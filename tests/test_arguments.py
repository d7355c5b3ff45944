"""The command line a transformers user expects: flags carried over from transformers' examples, enumerations
checked at parse time, errors that name the flag, help that shows the real defaults."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser

from sparse_semi_detr_hf.training.arguments import PRESETS, TrainingArguments, document_defaults
from sparse_semi_detr_hf.training.trainer import build_scheduler

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_ssod.py"


def parse(*argv: str) -> TrainingArguments:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=["--output_dir", "x", *argv])
    return args


def test_transformers_example_flags_are_aliases():
    args = parse("--per_device_train_batch_size", "3", "--per_device_eval_batch_size", "5",
                 "--dataloader_num_workers", "0", "--num_warmup_steps", "7")
    assert (args.labeled_batch_size, args.eval_batch_size, args.num_workers, args.lr_warmup_steps) == (3, 5, 0, 7)
    assert parse("--warmup_steps", "2").lr_warmup_steps == 2
    assert not parse("--ignore_mismatched_sizes", "false").ignore_mismatched_sizes
    assert parse("--trust_remote_code", "--cache_dir", "/c").trust_remote_code


@pytest.mark.parametrize("flag, value", [("--query_mode", "bogus"), ("--lr_scheduler_type", "exotic"),
                                         ("--qrm_attention_on", "middle"), ("--preset", "huge"),
                                         ("--deformable_attention_backend", "cuda")])
def test_enumerations_are_checked_when_parsing(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse(flag, value)
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--report_to", "bogus"], "--report_to: unknown tracker"),
    (["--num_train_epochs", "3"], "use --max_steps"),
    (["--eval_steps", "0"], "--eval_steps must be >= 1"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be >= 1"),
    (["--logging_steps", "0"], "--logging_steps must be >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)
    assert parse("--report_to", "tensorboard,wandb").report_to == "tensorboard,wandb"


def test_help_shows_the_defaults_presets_and_the_model_config_give():
    spec = importlib.util.spec_from_file_location("train_ssod", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = HfArgumentParser(TrainingArguments)
    document_defaults(parser)
    text = parser.format_help()
    assert "(default: None)" not in text
    assert f"synthetic: {PRESETS['synthetic']['max_steps']}" in text and "paper: 120000" in text
    assert "the model config's value" in text and "(default: 42)" in text
    assert module.parse_args(["--output_dir", "x"]).max_steps == PRESETS["synthetic"]["max_steps"]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_learning_rate_schedules(kind):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, parse("--lr_scheduler_type", kind, "--lr_warmup_steps", "2",
                                                 "--max_steps", "10"))
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[2] == pytest.approx(1.0)  # the warm-up
    if kind == "constant":
        assert rates[2:] == [1.0] * 8
    else:
        assert rates[-1] < 0.2 and all(a >= b for a, b in zip(rates[2:], rates[3:]))


def test_view_overrides_reach_the_views_and_typos_stop_at_parse_time():
    args = parse("--view_overrides", "rotate_degrees=15,shear_degrees=0,erase_patches=0:2,colour_ops=identity,"
                 "flip_prob=0.25", "--image_scales", "96,112", "--max_image_size", "160")
    views = args.view_config()
    assert (views.rotate_degrees, views.shear_degrees, views.erase_patches) == (15, 0, (0, 2))
    assert (views.colour_ops, views.flip_prob, views.scales, views.max_size) == (("identity",), 0.25, (96, 112), 160)
    assert parse().view_config().rotate_degrees == 30.0  # the paper's view by default
    with pytest.raises(ValueError, match="view_overrides: unknown field 'rotate'"):
        parse("--view_overrides", "rotate=15")
    with pytest.raises(ValueError, match="flip_prob"):
        parse("--view_overrides", "flip_prob=2")


def test_pseudo_label_nms_and_mean_std_filter_are_method_flags():
    args = parse("--one_to_many_nms_iou", "0.5", "--pseudo_label_mean_std_filter", "true")
    kwargs = args.model_config_kwargs()
    assert kwargs["one_to_many_nms_iou"] == 0.5 and kwargs["pseudo_label_mean_std_filter"] is True
    assert "one_to_many_nms_iou" not in parse().user_model_fields  # else the model config's value


def test_qrm_mlp_projector_flag_reaches_the_model():
    from sparse_semi_detr_hf import SparseSemiDetrConfig
    from sparse_semi_detr_hf.query_refinement import QueryRefinementModule

    kwargs = parse("--qrm_mlp_projector", "true").model_config_kwargs()
    assert kwargs["qrm_mlp_projector"] is True and "qrm_mlp_projector" not in parse().model_config_kwargs()
    config = SparseSemiDetrConfig(d_model=32, qrm_reduced_dim=16, qrm_attention_heads=4,
                                  qrm_mlp_projector=kwargs["qrm_mlp_projector"])
    assert QueryRefinementModule(config).low_projector is not None
