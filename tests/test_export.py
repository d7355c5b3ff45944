"""ONNX export (examples/export_onnx.py): dynamic batch and image size, ONNX Runtime equals PyTorch, and the export
folder pre- and post-processes through AutoImageProcessor without the package. The export runs once per session
(``conftest.tiny_onnx_export``; README's ONNX block uses it too)."""

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor

from sparse_semi_detr_hf import SparseSemiDetrForObjectDetection


def test_onnx_export_matches_pytorch_at_other_sizes_and_batches(tiny_onnx_export):
    import onnxruntime

    report = tiny_onnx_export["report"]
    assert max(report["max_abs_difference"].values()) <= 1e-4  # batch 1 and a padded batch of 2, new sizes
    model = SparseSemiDetrForObjectDetection.from_pretrained(tiny_onnx_export["model_dir"]).eval()

    # the export folder serves users without the package: processor in, ONNX Runtime, post-processing out
    processor = AutoImageProcessor.from_pretrained(tiny_onnx_export["onnx_dir"], trust_remote_code=True)
    image = np.random.default_rng(5).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    inputs = processor(images=image, size={"height": 150, "width": 250}, return_tensors="np")
    session = onnxruntime.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]})
    detections = processor.post_process_object_detection(
        {"logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}, 0.0, [(90, 150)])[0]
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(inputs["pixel_values"]),
                         pixel_mask=torch.from_numpy(inputs["pixel_mask"]))
    reference = processor.post_process_object_detection(expected, 0.0, [(90, 150)])[0]
    torch.testing.assert_close(detections["scores"], reference["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(detections["boxes"], reference["boxes"], atol=1e-3, rtol=0)

    with torch.no_grad():  # the check fails when the graph and the model disagree
        model.model.class_head.bias.add_(0.1)
    with pytest.raises(AssertionError, match="differ"):
        tiny_onnx_export["script"].check(model, processor, report["onnx"], atol=1e-4)
