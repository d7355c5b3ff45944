"""Shared fixtures: tiny seeded configs and synthetic batches (CPU, no network)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config_kwargs(**overrides) -> dict:
    """A DINO small enough for CPU tests: resnet18 from scratch, d_model 32, 2+2 layers, 20 queries."""
    kwargs = dict(
        backbone="resnet18",
        backbone_frozen_stages=0,  # random weights: train every stage (DINO's 1 is for an ImageNet start)
        freeze_backbone_batch_norm=False,
        num_labels=3,
        d_model=32,
        neck_group_norm_groups=8,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=20,
        num_denoising_queries=8,
        num_detections=30,
        qrm_reduced_dim=16,
        qrm_attention_heads=2,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    from sparse_semi_detr_hf import SparseSemiDetrConfig

    return SparseSemiDetrConfig(**tiny_config_kwargs())


def random_targets(batch_size: int, counts: list[int], num_labels: int = 3, generator=None) -> list[dict]:
    """Targets with ``counts[b]`` random boxes (cxcywh in [0.2, 0.8], sides in [0.1, 0.3])."""
    targets = []
    for b in range(batch_size):
        n = counts[b]
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.2 + 0.1
        targets.append(
            {
                "class_labels": torch.randint(0, num_labels, (n,), generator=generator),
                "boxes": torch.cat((centres, sizes), -1),
            }
        )
    return targets


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_onnx_export(tmp_path_factory) -> dict:
    """``examples/export_onnx.py`` run once on ``test_remote_code.save_tiny_model``'s model (with its ONNX Runtime
    check): ``{"model_dir", "onnx_dir", "report", "script"}``. Skips without the ``[onnx]`` extra."""
    pytest.importorskip("onnxscript", reason="ONNX export needs the [onnx] extra (in [dev])")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs the [onnx] extra (in [dev])")
    import importlib.util
    from pathlib import Path

    from test_remote_code import save_tiny_model

    path = Path(__file__).resolve().parents[1] / "examples" / "export_onnx.py"
    spec = importlib.util.spec_from_file_location("export_onnx", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = tmp_path_factory.mktemp("onnx_export")
    save_tiny_model(folder / "model")
    report = script.main(["--model", str(folder / "model"), "--output_dir", str(folder / "onnx")])
    return {"model_dir": folder / "model", "onnx_dir": folder / "onnx", "report": report, "script": script}


def save_without(model, folder, prefixes: tuple[str, ...]) -> list[str]:
    """Save ``model`` to ``folder`` with every weight whose name starts with one of ``prefixes`` left out."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    dropped = [name for name in weights if name.startswith(prefixes)]
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return dropped


def crowded_one_to_many_outputs(objects: int = 30, duplicates: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, objects * duplicates, 2)`` logits / cxcywh boxes: every object predicted ``duplicates`` times (as in the
    one-to-many stage), the copies slightly shifted, scores from 0.95 down (object-major) and all >= 0.5."""
    grid = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(5), indexing="ij"), -1).flatten(0, 1)[:objects]
    centres = (grid.float() + 0.5) / torch.tensor([6.0, 5.0])
    shift = torch.linspace(0, 0.004, duplicates)
    boxes = torch.cat([centres[:, None].expand(-1, duplicates, -1) + shift[None, :, None],
                       torch.full((objects, duplicates, 2), 0.1)], -1).flatten(0, 1)
    scores = torch.linspace(0.95, 0.5, objects * duplicates)
    logits = torch.full((1, objects * duplicates, 2), -10.0)
    logits[0, :, 0] = torch.log(scores / (1 - scores))
    return logits, boxes[None]
