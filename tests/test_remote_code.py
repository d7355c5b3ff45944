"""Auto classes, remote code in a process that cannot import the package, and the object-detection pipeline."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from conftest import save_without, tiny_config_kwargs
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, pipeline

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection, SparseSemiDetrImageProcessor


def save_tiny_model(folder) -> tuple[SparseSemiDetrForObjectDetection, SparseSemiDetrImageProcessor]:
    torch.manual_seed(0)
    config = SparseSemiDetrConfig(**tiny_config_kwargs(id2label={0: "cat", 1: "dog", 2: "bird"}))
    model = SparseSemiDetrForObjectDetection(config).eval()
    processor = SparseSemiDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_auto_classes_resolve_to_our_classes(tmp_path):
    save_tiny_model(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SparseSemiDetrConfig)
    assert isinstance(AutoModelForObjectDetection.from_pretrained(tmp_path), SparseSemiDetrForObjectDetection)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), SparseSemiDetrImageProcessor)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForObjectDetection"].endswith("SparseSemiDetrForObjectDetection")
    for name in ("modeling_sparse_semi_detr.py", "configuration_sparse_semi_detr.py", "deformable_attention.py",
                 "image_processing_sparse_semi_detr.py", "loss.py", "query_refinement.py"):
        assert (tmp_path / name).exists(), name


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.modules["sparse_semi_detr_hf"] = None  # the package must not be importable here
    from transformers import AutoImageProcessor, AutoModelForObjectDetection
    folder, inputs_path, out_path, partial = sys.argv[1:5]
    model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    pil_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="pil")
    assert "sparse_semi_detr_hf" not in type(model).__module__, type(model).__module__
    from transformers import AutoModel
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "SparseSemiDetrModel", type(base)
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(**inputs).logits
    relabeled = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True, num_labels=5,
                                                            ignore_mismatched_sizes=True)
    biases = [relabeled.model.class_head.bias, relabeled.model.query_selection.class_head.bias]
    partial = AutoModelForObjectDetection.from_pretrained(partial, trust_remote_code=True).model
    remade = {"box_head_last": partial.box_head.layers[-1].weight,
              "sampling_offsets_bias": partial.encoder.layers[0].self_attn.sampling_offsets.bias,
              "attention_weights": partial.encoder.layers[0].self_attn.attention_weights.weight}
    torch.save({"logits": logits, "processor": type(processor).__name__,
                "pil_processor": type(pil_processor).__name__, "relabeled_biases": biases, "remade": remade},
               out_path)
    """
)


def test_remote_code_in_clean_process_gives_identical_logits(tmp_path):
    folder = tmp_path / "model"
    model, processor = save_tiny_model(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    inputs = dict(processor(images=[image], return_tensors="pt"))
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    trained = SparseSemiDetrForObjectDetection.from_pretrained(folder)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.1)
    save_without(trained, tmp_path / "partial", ("model.box_head.", "model.encoder.layers.0.self_attn."))
    for name in ("configuration_sparse_semi_detr.py", "modeling_sparse_semi_detr.py"):
        assert (tmp_path / "partial" / name).exists()
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
         str(tmp_path / "partial")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["processor"] == "SparseSemiDetrImageProcessor"
    assert out["pil_processor"] == "SparseSemiDetrImageProcessorPil"
    torch.testing.assert_close(out["logits"], expected, atol=0, rtol=0)
    prior = -math.log(99)  # heads re-made for a new label set start at the focal prior, as in a fresh model
    for bias in out["relabeled_biases"]:
        torch.testing.assert_close(bias.detach(), torch.full((5,), prior))
    # modules missing from a checkpoint get DINO's init under remote code too
    remade = out["remade"]
    assert remade["box_head_last"].abs().sum() == 0 and remade["attention_weights"].abs().sum() == 0
    torch.testing.assert_close(remade["sampling_offsets_bias"].detach(),
                               model.model.encoder.layers[0].self_attn.sampling_offsets.bias.detach())


def test_object_detection_pipeline_returns_detections(tmp_path):
    save_tiny_model(tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path), device="cpu")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    detections = detector(image, threshold=0.0)
    assert len(detections) > 0
    first = detections[0]
    assert set(first) == {"score", "label", "box"}
    assert first["label"] in {"cat", "dog", "bird"}
    assert 0 <= first["box"]["xmin"] <= first["box"]["xmax"] <= 80


def test_pipeline_batches_more_images_than_decoder_layers(tmp_path):
    """Bug fixed: ``batch_size`` above ``decoder_layers - 1`` raised ``IndexError`` (the pipeline slices every output
    field as the batch). Batched detections equal one-by-one detections."""
    save_tiny_model(tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path), device="cpu")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)) for _ in range(5)]
    batched = detector(images, threshold=0.0, batch_size=4)
    single = [detector(image, threshold=0.0) for image in images]
    assert len(batched) == 5
    for got, want in zip(batched, single):
        assert [d["label"] for d in got] == [d["label"] for d in want]
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-5)


def test_pipeline_batches_images_of_different_sizes_on_a_fixed_canvas(tmp_path):
    """transformers' pipeline cannot pad detection images of different sizes into one batch (its collate
    concatenates ``pixel_values``; the same holds for its Deformable DETR); README's way: an image processor with
    ``pad_size``. Batched detections equal one-by-one detections on the same canvas."""
    save_tiny_model(tmp_path)
    side = AutoImageProcessor.from_pretrained(str(tmp_path)).size["longest_edge"]  # README's canvas
    processor = AutoImageProcessor.from_pretrained(str(tmp_path), pad_size={"height": side, "width": side})
    detector = pipeline("object-detection", model=str(tmp_path), image_processor=processor, device="cpu")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in [(60, 80, 3), (90, 40, 3)]]
    batched = detector(images, threshold=0.0, batch_size=2)
    single = [detector(image, threshold=0.0) for image in images]
    for got, want in zip(batched, single):
        assert len(got) == len(want) > 0
        assert [d["box"] for d in got] == [d["box"] for d in want]
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-5)
    assert all(d["box"]["xmax"] <= 40 and d["box"]["ymax"] <= 90 for d in batched[1])
