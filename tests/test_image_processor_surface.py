"""The image processor takes transformers' DeformableDetrImageProcessor arguments and gives its outputs.

Each case runs both processors (torchvision and PIL backends) on the same images and COCO annotations and compares
pixels, masks and labels; then the task guide's collate, ``.pad()``, backend selection through AutoImageProcessor,
and the model's reading of canvas-normalized labels.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_config_kwargs
from torch.testing import assert_close
from transformers import AutoImageProcessor, DeformableDetrImageProcessor
from transformers.models.deformable_detr.image_processing_pil_deformable_detr import DeformableDetrImageProcessorPil

from sparse_semi_detr_hf import (
    SparseSemiDetrConfig,
    SparseSemiDetrForObjectDetection,
    SparseSemiDetrImageProcessor,
    SparseSemiDetrImageProcessorPil,
)

BACKENDS = [(SparseSemiDetrImageProcessor, DeformableDetrImageProcessor),
            (SparseSemiDetrImageProcessorPil, DeformableDetrImageProcessorPil)]
CASES = {
    "shortest_longest": {"size": {"shortest_edge": 48, "longest_edge": 80}},
    "shortest_longest_bicubic": {"size": {"shortest_edge": 40, "longest_edge": 64}, "resample": 3},
    "max_height_width_fixed_canvas": {"size": {"max_height": 64, "max_width": 64}, "do_pad": True,
                                      "pad_size": {"height": 64, "width": 64}},  # the task guide's settings
    "max_height_width": {"size": {"max_height": 50, "max_width": 70}},
    "height_width": {"size": {"height": 40, "width": 56}},
    "height_width_no_pad": {"size": {"height": 40, "width": 56}, "do_pad": False},
    "absolute_boxes": {"size": {"shortest_edge": 48, "longest_edge": 80}, "do_convert_annotations": False},
}


def images_and_annotations():
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 45), (52, 38))]
    annotations = [
        {"image_id": 7, "annotations": [
            {"bbox": [3.0, 4.0, 20.0, 10.0], "category_id": 1, "area": 200.0, "iscrowd": 0},
            {"bbox": [30.0, 20.0, 30.0, 30.0], "category_id": 2, "area": 900.0, "iscrowd": 0}]},  # clipped
        {"image_id": 8, "annotations": [{"bbox": [5.5, 6.0, 12.0, 30.0], "category_id": 0, "area": 360.0,
                                         "iscrowd": 0}]},
    ]
    return images, annotations


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ours_class, theirs_class", BACKENDS, ids=["torchvision", "pil"])
def test_same_outputs_as_deformable_detr_image_processor(case, ours_class, theirs_class):
    kwargs = CASES[case]
    images, annotations = images_and_annotations()
    ours = ours_class(**kwargs)(images, annotations=annotations, return_tensors="pt")
    theirs = theirs_class(**kwargs)(images, annotations=annotations, return_tensors="pt")
    assert set(ours) == set(theirs), (set(ours), set(theirs))
    assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)
    if "pixel_mask" in theirs:
        assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])
    for mine, reference in zip(ours["labels"], theirs["labels"]):
        for key in ("boxes", "class_labels", "area", "iscrowd", "orig_size", "size", "image_id"):
            assert_close(mine[key], torch.as_tensor(reference[key]).to(mine[key].dtype), atol=1e-5, rtol=1e-5,
                         msg=lambda m, key=key: f"{key}: {m}")


def test_the_task_guides_collate_trains_the_model():
    """Per-example processing at a fixed canvas, then the guide's ``torch.stack`` collate -> a finite loss."""
    processor = SparseSemiDetrImageProcessor(**CASES["max_height_width_fixed_canvas"])
    images, annotations = images_and_annotations()
    examples = []
    for image, annotation in zip(images, annotations):
        result = processor(images=[image], annotations=[annotation], return_tensors="pt")
        examples.append({key: value[0] for key, value in result.items()})
    batch = {"pixel_values": torch.stack([x["pixel_values"] for x in examples]),
             "pixel_mask": torch.stack([x["pixel_mask"] for x in examples]),
             "labels": [x["labels"] for x in examples]}
    torch.manual_seed(0)
    model = SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs()))
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_pad_collates_variable_size_examples_like_batch_processing():
    processor = SparseSemiDetrImageProcessor(**CASES["shortest_longest"])
    images, annotations = images_and_annotations()
    one_by_one = [processor(image, annotations=annotation) for image, annotation in zip(images, annotations)]
    padded = processor.pad([item["pixel_values"][0] for item in one_by_one],
                           annotations=[item["labels"][0] for item in one_by_one], return_tensors="pt")
    batched = processor(images, annotations=annotations)
    assert_close(padded["pixel_values"], batched["pixel_values"])
    assert torch.equal(padded["pixel_mask"], batched["pixel_mask"])
    for mine, reference in zip(padded["labels"], batched["labels"]):
        assert_close(mine["boxes"], reference["boxes"])
        assert torch.equal(mine["size"], reference["size"])
    fixed = processor.pad([item["pixel_values"][0] for item in one_by_one], pad_size={"height": 90, "width": 90},
                          return_pixel_mask=False)
    assert fixed["pixel_values"].shape == (2, 3, 90, 90) and "pixel_mask" not in fixed
    with pytest.raises(ValueError, match="pad_size"):
        processor.pad([item["pixel_values"][0] for item in one_by_one], pad_size={"height": 10, "width": 10})


def test_do_pad_false_with_different_sizes_says_what_to_do():
    processor = SparseSemiDetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 80}, do_pad=False)
    with pytest.raises(ValueError, match="do_pad=True"):
        processor(images_and_annotations()[0])


def test_model_reads_canvas_normalized_labels_in_its_own_frame():
    """Labels normalized by the padded canvas (``size`` = canvas) give the loss of the same boxes normalized by
    each image (no ``size``): the model maps them into the frame it predicts in, the pixel_mask region."""
    processor = SparseSemiDetrImageProcessor(**CASES["shortest_longest"])
    images, annotations = images_and_annotations()
    inputs = processor(images, annotations=annotations)
    unpadded = [processor(image, annotations=annotation, do_pad=False)["labels"][0]
                for image, annotation in zip(images, annotations)]
    image_frame = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in unpadded]
    assert not torch.allclose(inputs["labels"][1]["boxes"], image_frame[1]["boxes"])  # the canvas differs
    torch.manual_seed(0)
    model = SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs())).eval()
    canvas_loss = model(inputs["pixel_values"], inputs["pixel_mask"], labels=inputs["labels"]).loss_dict
    image_loss = model(inputs["pixel_values"], inputs["pixel_mask"], labels=image_frame).loss_dict
    for key in canvas_loss:
        assert_close(canvas_loss[key], image_loss[key], msg=key)


def test_auto_image_processor_backend_selects_the_class(tmp_path):
    SparseSemiDetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 80}).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is SparseSemiDetrImageProcessor
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(pil) is SparseSemiDetrImageProcessorPil and pil.size == {"shortest_edge": 48, "longest_edge": 80}
    overridden = AutoImageProcessor.from_pretrained(tmp_path, do_pad=True, pad_size={"height": 96, "width": 96})
    assert overridden.pad_size == {"height": 96, "width": 96}
    SparseSemiDetrImageProcessorPil().save_pretrained(tmp_path / "pil")  # one saved form for both backends
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "pil")) is SparseSemiDetrImageProcessor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_runs_the_processing_there():
    images, annotations = images_and_annotations()
    out = SparseSemiDetrImageProcessor(**CASES["shortest_longest"])(images, annotations=annotations, device="cuda")
    assert out["pixel_values"].is_cuda and out["pixel_mask"].is_cuda and out["labels"][0]["boxes"].is_cuda
