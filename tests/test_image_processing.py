"""Tests of SparseSemiDetrImageProcessor (and the examples/infer.py script) on CPU with tiny images."""

import importlib.util
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchvision.ops import batched_nms
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForObjectDetection,
    DeformableDetrImageProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    pipeline,
)
from transformers.utils import ModelOutput
from conftest import crowded_one_to_many_outputs

from sparse_semi_detr_hf.image_processing_sparse_semi_detr import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    SparseSemiDetrImageProcessor,
    get_resize_output_size,
)


SMALL = {"shortest_edge": 32, "longest_edge": 64}
REPO_ROOT = Path(__file__).resolve().parents[1]


def random_uint8(height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels is None else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def coco(image_id, *objects):
    return {"image_id": image_id, "annotations": list(objects)}


def obj(bbox, category_id, area=None, iscrowd=0):
    out = {"bbox": bbox, "category_id": category_id, "iscrowd": iscrowd}
    if area is not None:
        out["area"] = area
    return out


# ----------------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((480, 640), (800, 1066)),
        ((640, 480), (1066, 800)),
        ((500, 2000), (333, 1333)),  # long edge capped
        ((2000, 500), (1333, 333)),
        ((800, 1200), (800, 1200)),  # already at the target size
        ((1000, 1000), (800, 800)),
    ],
)
def test_resize_rule(hw, expected):
    assert get_resize_output_size(*hw, 800, 1333) == expected


def test_resize_rule_without_cap_and_extreme_aspect():
    assert get_resize_output_size(100, 1000, 800, None) == (800, 8000)
    assert min(get_resize_output_size(1, 10000, 800, 1333)) >= 1


def test_default_output_shapes_and_dtypes():
    out = SparseSemiDetrImageProcessor()(random_uint8(480, 640), return_tensors="pt")
    assert set(out.keys()) == {"pixel_values", "pixel_mask"}
    assert out["pixel_values"].shape == (1, 3, 800, 1066) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_mask"].shape == (1, 800, 1066) and out["pixel_mask"].dtype == torch.long
    assert bool((out["pixel_mask"] == 1).all())


def test_long_edge_capping_in_processor():
    out = SparseSemiDetrImageProcessor()(random_uint8(100, 400), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 333, 1333)


def test_normalization_of_constant_image():
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    out = SparseSemiDetrImageProcessor(size=SMALL)(image, return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    expected = ((128 / 255 - mean) / std).view(1, 3, 1, 1).expand_as(out)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_no_resize_no_normalize_gives_rescaled_pixels():
    image = random_uint8(7, 9)
    out = SparseSemiDetrImageProcessor(do_resize=False, do_normalize=False)(image)["pixel_values"]
    assert_close(out[0], torch.from_numpy(image).permute(2, 0, 1).float() / 255)


def test_padding_and_pixel_mask_for_two_sizes():
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    wide, tall = random_uint8(20, 40, seed=1), random_uint8(40, 20, seed=2)  # -> (32, 64) and (64, 32)
    out = processor([wide, tall], return_tensors="pt")
    pixel_values, pixel_mask = out["pixel_values"], out["pixel_mask"]
    assert pixel_values.shape == (2, 3, 64, 64) and pixel_mask.shape == (2, 64, 64)
    assert bool((pixel_mask[0, :32, :64] == 1).all()) and int(pixel_mask[0].sum()) == 32 * 64
    assert bool((pixel_mask[1, :64, :32] == 1).all()) and int(pixel_mask[1].sum()) == 64 * 32
    assert bool((pixel_values[0, :, 32:] == 0).all()) and bool((pixel_values[1, :, :, 32:] == 0).all())
    assert_close(pixel_values[0, :, :32, :64], processor(wide)["pixel_values"][0])
    assert_close(pixel_values[1, :, :64, :32], processor(tall)["pixel_values"][0])


def test_batched_4d_inputs_are_split_into_images():
    batch = np.stack([random_uint8(20, 30, seed=s) for s in range(3)])
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    out = processor(batch)
    assert out["pixel_values"].shape == (3, 3, 32, 48)
    assert_close(out["pixel_values"][2], processor(batch[2])["pixel_values"][0])


def test_return_tensors_np():
    out = SparseSemiDetrImageProcessor(size=SMALL)(random_uint8(20, 30), return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].shape == (1, 3, 32, 48)


# ----------------------------------------------------------------------------------------------- input types


def test_pil_numpy_torch_inputs_agree():
    array = random_uint8(24, 36)
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    reference = processor(PIL.Image.fromarray(array))["pixel_values"]
    tensor_chw = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    for variant in [array, tensor_chw, torch.from_numpy(array)]:  # HWC tensor: unambiguous layout
        assert_close(processor(variant)["pixel_values"], reference, atol=1e-5, rtol=1e-5)
    # floats are taken as already in [0, 1]; they are resized as floats, 8-bit images as 8 bits (as transformers
    # does), so the two differ by the rounding of the resized 8-bit pixels: at most one step, / std.
    one_step = 1 / 255 / min(processor.image_std) + 1e-5
    for variant in [array.astype(np.float32) / 255, tensor_chw.double() / 255]:
        assert_close(processor(variant)["pixel_values"], reference, atol=one_step, rtol=0)


def test_grayscale_inputs_agree_and_are_replicated():
    gray = random_uint8(24, 36, channels=None, seed=3)
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    reference = processor(np.repeat(gray[:, :, None], 3, axis=2))["pixel_values"]
    for variant in [PIL.Image.fromarray(gray, mode="L"), gray, gray[:, :, None], torch.from_numpy(gray)[None]]:
        assert_close(processor(variant)["pixel_values"], reference)


def test_rgba_and_palette_inputs_are_converted_to_rgb():
    rgba = random_uint8(24, 36, channels=4, seed=4)
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    reference = processor(np.ascontiguousarray(rgba[:, :, :3]))["pixel_values"]
    for variant in [PIL.Image.fromarray(rgba, mode="RGBA"), rgba, torch.from_numpy(rgba).permute(2, 0, 1)]:
        assert_close(processor(variant)["pixel_values"], reference)
    palette = PIL.Image.fromarray(random_uint8(24, 36, seed=5)).convert("P")
    assert_close(processor(palette)["pixel_values"], processor(palette.convert("RGB"))["pixel_values"])


def test_float_image_above_one_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        SparseSemiDetrImageProcessor(size=SMALL)(random_uint8(8, 8).astype(np.float32))
    assert "above 1" in caplog.text


def test_bad_inputs_raise():
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    with pytest.raises(ValueError, match="channel"):
        processor(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(TypeError):
        processor(42)  # paths are images now (test_file_paths_are_images_too)
    with pytest.raises(ValueError, match="annotation"):
        processor([random_uint8(8, 8)] * 2, annotations=[coco(1)])


def _image_with_exif_orientation(width, height, orientation):
    image = PIL.Image.fromarray(random_uint8(height, width, seed=6))
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif.tobytes())
    buffer.seek(0)
    return image, PIL.Image.open(buffer)


def test_exif_orientation_is_applied():
    raw, tagged = _image_with_exif_orientation(width=30, height=20, orientation=6)  # 6: rotate 90° clockwise
    processor = SparseSemiDetrImageProcessor(do_resize=False)
    out = processor(tagged, annotations=coco(1))
    assert out["pixel_values"].shape == (1, 3, 30, 20)
    assert out["labels"][0]["orig_size"].tolist() == [30, 20]
    assert_close(out["pixel_values"], processor(raw.transpose(PIL.Image.Transpose.ROTATE_270))["pixel_values"])
    unrotated = SparseSemiDetrImageProcessor(do_resize=False, do_exif_transpose=False)(tagged)
    assert unrotated["pixel_values"].shape == (1, 3, 20, 30)


# ----------------------------------------------------------------------------------------------- annotations


def test_annotation_conversion_clipping_degenerate_and_crowd():
    image = random_uint8(100, 200)  # (h, w) -> resized to (50, 100) with shortest_edge 50
    annotation = coco(
        42,
        obj([20, 10, 40, 30], 2, area=1000.0),
        obj([180, 90, 50, 20], 5, area=600.0),  # clipped to [180, 90, 200, 100]
        obj([250, 10, 10, 10], 1),  # outside the image: zero width after clipping
        obj([10, 10, 0, 5], 1),  # zero width
        obj([10, 10, 20, -5], 1),  # negative height
        obj([30, 30, 10, 10], 3, iscrowd=1),  # crowd: dropped from training labels
    )
    out = SparseSemiDetrImageProcessor(size={"shortest_edge": 50, "longest_edge": 1000})(
        image, annotations=[annotation], return_tensors="pt"
    )
    target = out["labels"][0]
    assert target["class_labels"].dtype == torch.long and target["class_labels"].tolist() == [2, 5]
    expected = torch.tensor([[0.2, 0.25, 0.2, 0.3], [0.95, 0.95, 0.1, 0.1]])
    assert target["boxes"].dtype == torch.float32
    assert_close(target["boxes"], expected)
    assert_close(target["area"], torch.tensor([250.0, 150.0]))  # scaled by (50 * 100) / (100 * 200)
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["image_id"].tolist() == [42]
    assert target["orig_size"].tolist() == [100, 200] and target["size"].tolist() == [50, 100]


def test_padded_boxes_are_normalized_by_the_canvas_named_in_size():
    """transformers' convention: with padding, boxes are normalized by the canvas, and ``size`` is the canvas."""
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    annotation = coco(1, obj([4, 2, 10, 6], 0))
    alone = processor(random_uint8(20, 40), annotations=annotation)["labels"][0]
    assert_close(alone["boxes"], torch.tensor([[9 / 40, 5 / 20, 10 / 40, 6 / 20]]))
    assert alone["size"].tolist() == [32, 64]
    padded = processor([random_uint8(20, 40), random_uint8(40, 20)], annotations=[annotation, coco(2)])
    assert padded["pixel_values"].shape[-2:] == (64, 64)
    assert padded["labels"][0]["size"].tolist() == [64, 64]
    assert_close(padded["labels"][0]["boxes"], alone["boxes"] * torch.tensor([1.0, 0.5, 1.0, 0.5]))


def test_missing_area_defaults_to_box_area():
    processor = SparseSemiDetrImageProcessor(do_resize=False)
    out = processor(random_uint8(20, 20), annotations=coco(1, obj([0, 0, 4, 5], 1)))
    assert_close(out["labels"][0]["area"], torch.tensor([20.0]))


def test_empty_annotations():
    out = SparseSemiDetrImageProcessor(size=SMALL)(random_uint8(20, 30), annotations=[coco(7)])
    target = out["labels"][0]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["class_labels"].shape == (0,) and target["class_labels"].dtype == torch.long
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)
    assert target["image_id"].tolist() == [7] and target["size"].tolist() == [32, 48]


@pytest.mark.parametrize(
    "bad_object, message",
    [
        ({"bbox": [1, 2, 3], "category_id": 1}, "bbox"),
        ({"bbox": "1234", "category_id": 1}, "bbox"),
        ({"bbox": [1, 2, float("nan"), 3], "category_id": 1}, "non-finite"),
        ({"bbox": [1, 2, 3, float("inf")], "category_id": 1}, "non-finite"),
        ({"bbox": ["a", 2, 3, 4], "category_id": 1}, "non-numeric"),
        ({"bbox": [1, 2, 3, 4], "category_id": 1.5}, "category_id"),
        ({"bbox": [1, 2, 3, 4]}, "category_id"),
    ],
)
def test_invalid_annotations_raise_naming_the_image(bad_object, message):
    processor = SparseSemiDetrImageProcessor(size=SMALL)
    images = [random_uint8(10, 10), random_uint8(10, 10)]
    with pytest.raises(ValueError, match=message) as info:
        processor(images, annotations=[coco(1), coco(1234, obj([0, 0, 2, 2], 0), bad_object)])
    assert "image 1 (image_id=1234)" in str(info.value) and "object 1" in str(info.value)


def test_annotation_without_image_id_raises():
    with pytest.raises(ValueError, match="image_id"):
        SparseSemiDetrImageProcessor(size=SMALL)(random_uint8(10, 10), annotations=[{"annotations": []}])


# ----------------------------------------------------------------------------------------------- post-processing


@dataclass
class DetectionOutput(ModelOutput):
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None


def random_outputs(batch=2, queries=20, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=generator)
    boxes = torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.2
    return DetectionOutput(logits=logits, pred_boxes=boxes)


def test_post_process_top_k_across_classes():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 2], logits[0, 1, 3], logits[0, 0, 0] = 5.0, 4.0, 3.0  # query 1 gives two labels
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 0.1, 0.1]]])
    result = SparseSemiDetrImageProcessor().post_process_object_detection(
        DetectionOutput(logits=logits, pred_boxes=boxes), threshold=0.0, top_k=3
    )[0]
    assert result["labels"].tolist() == [2, 3, 0]
    assert_close(result["scores"], torch.tensor([5.0, 4.0, 3.0]).sigmoid())
    assert_close(result["boxes"], torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.5, 1.0], [0.4, 0.4, 0.6, 0.6]]))


def test_post_process_threshold_and_top_k_clamp():
    outputs = random_outputs(queries=5, classes=3)
    processor = SparseSemiDetrImageProcessor()
    everything = processor.post_process_object_detection(outputs, threshold=-1.0, top_k=1000)
    assert all(len(r["scores"]) == 15 for r in everything)  # clamped to Q * C
    kept = processor.post_process_object_detection(outputs, threshold=0.6, top_k=1000)
    for full, part in zip(everything, kept):
        assert bool((part["scores"] > 0.6).all())
        assert len(part["scores"]) == int((full["scores"] > 0.6).sum())


def test_post_process_class_wise_nms_matches_torchvision(tmp_path):
    """``nms_threshold`` (argument or saved processor setting): class-wise NMS over the kept pairs, as
    torchvision's batched_nms does it; 1.0 switches a saved setting off."""
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, :, 0] = torch.tensor([4.0, 3.0, 2.0, -10.0])
    logits[0, 3, 1] = 1.0  # same box as query 0, other class: kept
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4]]])
    outputs = DetectionOutput(logits=logits, pred_boxes=boxes)
    plain = SparseSemiDetrImageProcessor().post_process_object_detection(outputs, threshold=0.5)[0]
    assert len(plain["scores"]) == 4
    expected = batched_nms(plain["boxes"], plain["scores"], plain["labels"], 0.6)
    by_argument = SparseSemiDetrImageProcessor().post_process_object_detection(outputs, 0.5, nms_threshold=0.6)[0]
    SparseSemiDetrImageProcessor(nms_threshold=0.6).save_pretrained(tmp_path)
    saved = AutoImageProcessor.from_pretrained(tmp_path)
    assert saved.nms_threshold == 0.6
    by_setting = saved.post_process_object_detection(outputs, 0.5)[0]
    for result in (by_argument, by_setting):
        assert_close(result["scores"], plain["scores"][expected])
        assert result["labels"].tolist() == [0, 0, 1]  # the near-duplicate of query 0 is gone
    assert len(saved.post_process_object_detection(outputs, 0.5, nms_threshold=1.0)[0]["scores"]) == 4
    with pytest.raises(ValueError, match="nms_threshold"):
        SparseSemiDetrImageProcessor(nms_threshold=1.5)


def test_post_process_nms_before_top_k_keeps_every_object():
    """Bug fixed: with NMS the top ``top_k`` pairs were taken first, so a one-to-many model's duplicates crowded out
    objects (30 objects x 13 copies, top 300: 24 detections). Now NMS over every pair above the threshold, then
    the ``top_k`` best (mmdet's multiclass_nms, as Semi-DETR evaluates)."""
    logits, boxes = crowded_one_to_many_outputs()
    outputs = DetectionOutput(logits=logits, pred_boxes=boxes)
    processor = SparseSemiDetrImageProcessor()
    detections = processor.post_process_object_detection(outputs, 0.0, top_k=300, nms_threshold=0.6)[0]
    class0 = detections["labels"] == 0
    assert int(class0.sum()) == 30  # every object once (the class-1 pairs at score ~0 are other boxes' labels)
    assert len(detections["scores"]) <= 300
    assert bool((detections["scores"][:-1] >= detections["scores"][1:]).all())
    top10 = processor.post_process_object_detection(outputs, 0.0, top_k=10, nms_threshold=0.6)[0]
    assert_close(top10["scores"], detections["scores"][:10])
    assert len(processor.post_process_object_detection(outputs, 0.0, top_k=300)[0]["scores"]) == 300  # no NMS


def test_post_process_target_sizes_tensor_and_list():
    outputs = random_outputs()
    processor = SparseSemiDetrImageProcessor()
    normalized = processor.post_process_object_detection(outputs, threshold=0.3)
    from_tensor = processor.post_process_object_detection(outputs, 0.3, torch.tensor([[100, 200], [50, 80]]))
    from_list = processor.post_process_object_detection(outputs, 0.3, [(100, 200), (50, 80)])
    for norm, a, b, (h, w) in zip(normalized, from_tensor, from_list, [(100, 200), (50, 80)]):
        assert_close(a["boxes"], norm["boxes"] * torch.tensor([w, h, w, h], dtype=torch.float32))
        assert_close(a["boxes"], b["boxes"])
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_object_detection(outputs, 0.3, [(100, 200)])


def test_post_process_bfloat16_outputs_in_float32():
    """Bug fixed: a bf16 model's boxes were scaled in bf16 (8 significant bits), so pixel coordinates above 1024 came
    out in steps of 8 (920 -> 928 measured through the pipeline). Now: the same detections as the float32 values."""
    outputs = random_outputs(queries=30, classes=3, seed=4)
    low = DetectionOutput(logits=outputs.logits.bfloat16(), pred_boxes=outputs.pred_boxes.bfloat16())
    exact = DetectionOutput(logits=low.logits.float(), pred_boxes=low.pred_boxes.float())
    processor = SparseSemiDetrImageProcessor()
    sizes = [(1333, 2000), (800, 1333)]
    for got, want in zip(processor.post_process_object_detection(low, 0.3, sizes),
                         processor.post_process_object_detection(exact, 0.3, sizes)):
        assert got["boxes"].dtype == got["scores"].dtype == torch.float32
        assert_close(got["boxes"], want["boxes"], rtol=0, atol=0)
        assert_close(got["scores"], want["scores"], rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [10, 50, 500])
def test_post_process_matches_deformable_detr(top_k):
    outputs = random_outputs(batch=3, queries=30, classes=7, seed=top_k)
    sizes = torch.tensor([[480, 640], [100, 50], [33, 77]])
    ours = SparseSemiDetrImageProcessor().post_process_object_detection(outputs, 0.4, sizes, top_k=top_k)
    theirs = DeformableDetrImageProcessor().post_process_object_detection(outputs, 0.4, sizes, top_k=top_k)
    for a, b in zip(ours, theirs):
        assert len(a["scores"]) > 0
        assert_close(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])
        assert_close(a["boxes"], b["boxes"])


# ----------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    processor = SparseSemiDetrImageProcessor(
        size={"shortest_edge": 40, "longest_edge": 70}, resample=3, do_exif_transpose=False, image_mean=[0.5] * 3
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "SparseSemiDetrImageProcessor"
    assert saved["size"] == {"shortest_edge": 40, "longest_edge": 70} and saved["resample"] == 3
    loaded = SparseSemiDetrImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = random_uint8(30, 50)
    assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    overridden = SparseSemiDetrImageProcessor.from_pretrained(tmp_path, size={"shortest_edge": 20, "longest_edge": 30})
    assert overridden.size == {"shortest_edge": 20, "longest_edge": 30} and overridden.resample == 3


@pytest.mark.parametrize("size", [{"height": 10}, {"max_height": 0, "max_width": 5}, {"longest_edge": 9}, "800",
                                  {"shortest_edge": 20, "longest_edge": 10}])
def test_invalid_sizes_raise(size):
    with pytest.raises(ValueError, match="size"):
        SparseSemiDetrImageProcessor(size=size)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="pad_size"):
        SparseSemiDetrImageProcessor(pad_size={"height": 10})
    with pytest.raises(ValueError, match="coco_panoptic"):
        SparseSemiDetrImageProcessor(format="coco_panoptic")
    with pytest.raises(ValueError, match="box detector"):
        SparseSemiDetrImageProcessor()(random_uint8(8, 8), return_segmentation_masks=True)
    with pytest.raises(ValueError, match="resample"):
        SparseSemiDetrImageProcessor(resample=1)


# ----------------------------------------------------------------------------------------------- pipeline / infer


class DummyDetectorConfig(PreTrainedConfig):
    model_type = "sparse_semi_detr_test_dummy_detector"

    def __init__(self, num_queries=6, **kwargs):
        self.num_queries = num_queries
        kwargs.setdefault("num_labels", 3)
        super().__init__(**kwargs)


class DummyDetector(PreTrainedModel):
    """Input-independent detector: fixed logits (Q, C) and boxes (Q, 4) for every image."""

    config_class = DummyDetectorConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.logit_table = nn.Parameter(torch.randn(config.num_queries, config.num_labels))
        self.box_table = nn.Parameter(torch.randn(config.num_queries, 4))
        self.post_init()

    def forward(self, pixel_values, pixel_mask=None, **kwargs):
        batch = pixel_values.shape[0]
        logits = self.logit_table.unsqueeze(0).repeat(batch, 1, 1)
        return DetectionOutput(logits=logits, pred_boxes=self.box_table.sigmoid().unsqueeze(0).repeat(batch, 1, 1))


def make_dummy_detector():
    torch.manual_seed(0)
    config = DummyDetectorConfig(id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})
    return DummyDetector(config).eval()


def test_object_detection_pipeline_with_dummy_model():
    model, processor = make_dummy_detector(), SparseSemiDetrImageProcessor(size=SMALL)
    detector = pipeline("object-detection", model=model, image_processor=processor)
    image = PIL.Image.fromarray(random_uint8(30, 40))
    detections = detector(image, threshold=0.2)
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    expected = processor.post_process_object_detection(outputs, 0.2, torch.tensor([[30, 40]]))[0]
    assert len(detections) == len(expected["scores"]) > 0
    for det, score, label, box in zip(detections, expected["scores"], expected["labels"], expected["boxes"]):
        assert det["score"] == pytest.approx(float(score))
        assert det["label"] == model.config.id2label[int(label)]
        assert [det["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == box.int().tolist()


def _load_infer_module():
    spec = importlib.util.spec_from_file_location("infer_example", REPO_ROOT / "examples" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_infer_script_writes_outputs_and_skips_unreadable_files(tmp_path):
    AutoConfig.register(DummyDetectorConfig.model_type, DummyDetectorConfig, exist_ok=True)
    AutoModelForObjectDetection.register(DummyDetectorConfig, DummyDetector, exist_ok=True)
    processor_classes = {"torchvision": SparseSemiDetrImageProcessor, "pil": SparseSemiDetrImageProcessor}
    AutoImageProcessor.register(DummyDetectorConfig, image_processor_classes=processor_classes, exist_ok=True)
    model_dir = tmp_path / "model"
    make_dummy_detector().save_pretrained(model_dir)
    SparseSemiDetrImageProcessor(size=SMALL).save_pretrained(model_dir)
    good, other, corrupt = tmp_path / "a.png", tmp_path / "sub" / "a.jpg", tmp_path / "broken.jpg"
    PIL.Image.fromarray(random_uint8(30, 40)).save(good)
    other.parent.mkdir()
    PIL.Image.fromarray(random_uint8(20, 25, seed=9)).save(other)
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out_dir = tmp_path / "out"
    argv = ["--model", str(model_dir), str(good), str(corrupt), str(other), "--output_dir", str(out_dir)]
    exit_code = _load_infer_module().main(argv + ["--threshold", "0.2", "--device", "cpu", "--batch_size", "2"])
    assert exit_code == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.json", "a.png", "a_1.json", "a_1.png"]
    detections = json.loads((out_dir / "a.json").read_text())
    assert len(detections) > 0
    for det in detections:
        assert set(det) == {"label", "label_id", "score", "box"} and det["score"] > 0.2
        assert det["label"] == {0: "cat", 1: "dog", 2: "bird"}[det["label_id"]] and len(det["box"]) == 4
    assert PIL.Image.open(out_dir / "a_1.png").size == (25, 20)
    graphs_dir = tmp_path / "out_graphs"  # --cuda_graphs on CPU: the eager forward, the same detections
    argv = ["--model", str(model_dir), str(good), "--output_dir", str(graphs_dir), "--cuda_graphs"]
    assert _load_infer_module().main(argv + ["--threshold", "0.2", "--device", "cpu"]) == 0
    assert json.loads((graphs_dir / "a.json").read_text()) == detections


def test_file_paths_are_images_too(tmp_path):
    """As transformers' image processors: a path (str or PathLike) is opened like the PIL image it holds."""
    array = np.random.default_rng(3).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    PIL.Image.fromarray(array).save(path)
    processor = SparseSemiDetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    expected = processor(images=PIL.Image.fromarray(array), return_tensors="pt")["pixel_values"]
    for given in (str(path), path, [path]):
        assert_close(processor(images=given, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no image file"):
        processor(images=str(tmp_path / "missing.png"))
