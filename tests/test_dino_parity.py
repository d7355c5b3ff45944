"""Exact parity with the ORIGINAL IDEA-Research DINO, through ``convert_dino_to_hf``.

``tests/fixtures/dino_parity.pt`` is written by ``benchmarks/make_dino_parity_fixture.py`` from DINO's own code: a
tiny random DINO (d_model 64, 2 encoder + 3 decoder layers, 4 levels, 30 queries, 91 classes) without backbone
weights, the multi-scale backbone maps fed to it, and its outputs (eval and train mode). No DINO code runs here: the
state dict is converted, loaded into ``SparseSemiDetrForObjectDetection`` with strict key checks, the same maps are
injected in place of our backbone, and every output is compared.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_semi_detr_hf import SparseSemiDetrForObjectDetection, SparseSemiDetrImageProcessor
from sparse_semi_detr_hf.convert_dino_to_hf import (
    build_config_from_dino,
    check_converted_state_dict,
    convert_dino_state_dict,
)
from sparse_semi_detr_hf.position_encoding import anchor_sine_embedding

FIXTURE = Path(__file__).parent / "fixtures" / "dino_parity.pt"
ATOL = 1e-4
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=False)


def dino_state_dict(fixture: dict) -> dict:
    """The stored DINO state dict in float32 (stored as float16; the values are float16-representable)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in fixture["state_dict"].items()}


def converted_model(fixture: dict, **overrides) -> SparseSemiDetrForObjectDetection:
    """Config from the DINO state dict + args, converted weights, strict key check (backbone excepted)."""
    state_dict = dino_state_dict(fixture)
    config = build_config_from_dino(state_dict, fixture["args"], **overrides)
    model = SparseSemiDetrForObjectDetection(config)
    converted = convert_dino_state_dict(state_dict)
    missing_backbone = check_converted_state_dict(converted, model, allow_missing_backbone=True)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and sorted(missing) == sorted(missing_backbone)
    assert missing and all(key.startswith("model.backbone.") for key in missing)
    return inject_features(model, fixture)


def inject_features(model, fixture: dict):
    """Replace the backbone by the fixture's fixed maps ``[(2, C_l, H_l, W_l)]`` (what DINO's backbone returned)."""
    features = [f.float() for f in fixture["inputs"]["features"]]
    model.model.backbone.forward = lambda pixel_values: [f.clone() for f in features]
    return model


def model_inputs(fixture: dict) -> dict:
    """``pixel_values (2, 3, 96, 128)`` (zeros: the backbone is bypassed) and ``pixel_mask (2, 96, 128)``."""
    mask = fixture["inputs"]["pixel_mask"].long()
    return {"pixel_values": torch.zeros(mask.shape[0], 3, *mask.shape[1:]), "pixel_mask": mask}


def our_labels(targets: list[dict]) -> list[dict]:
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


def assert_close(actual, expected, name: str, atol: float = ATOL) -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert diff <= atol, f"{name}: max abs diff {diff:.3e} > {atol}"


def dino_to_our_loss_key(key: str) -> str:
    return key.replace("_interm", "_enc")


def compare_losses(ours: dict, dino: dict, rtol: float = LOSS_RTOL, only=None) -> dict:
    """Relative differences of every DINO loss term (loss_ce/bbox/giou with all suffixes) against ours."""
    errors = {}
    for key, value in dino.items():
        if not key.startswith(("loss_ce", "loss_bbox", "loss_giou")):
            continue
        if only is not None and not only(key):
            continue
        mine = ours[dino_to_our_loss_key(key)].item()
        errors[key] = abs(mine - value.item()) / max(abs(value.item()), 1e-8)
    return errors


def eval_outputs(model, fixture: dict):
    model.eval()
    with torch.no_grad():
        return model(**model_inputs(fixture))


def train_outputs(model, fixture: dict, name: str):
    model.train()
    torch.manual_seed(0)
    return model(**model_inputs(fixture), labels=our_labels(fixture["inputs"][name]))


def test_state_dict_converts_with_no_missing_or_unexpected_keys(fixture):
    converted_model(fixture)  # asserts inside


def test_converter_refuses_unknown_keys_and_unshared_heads(fixture):
    state_dict = dino_state_dict(fixture)
    with pytest.raises(KeyError, match="no counterpart"):
        convert_dino_state_dict({**state_dict, "transformer.some_new_module.weight": torch.zeros(1)})
    broken = dict(state_dict)
    broken["class_embed.1.weight"] = state_dict["class_embed.1.weight"] + 1
    with pytest.raises(ValueError, match="unshared"):
        convert_dino_state_dict(broken)
    model = SparseSemiDetrForObjectDetection(build_config_from_dino(state_dict, fixture["args"]))
    converted = convert_dino_state_dict(state_dict)
    with pytest.raises(KeyError, match="backbone"):
        check_converted_state_dict(converted, model)
    converted.pop("model.decoder.norm.weight")
    with pytest.raises(KeyError, match="missing"):
        check_converted_state_dict(converted, model, allow_missing_backbone=True)


def test_build_config_from_dino_infers_the_architecture(fixture):
    config = build_config_from_dino(dino_state_dict(fixture), fixture["args"])
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_queries) == (64, 2, 3, 30)
    assert (config.num_labels, config.num_feature_levels, config.decoder_attention_heads) == (91, 4, 4)
    assert config.backbone == "test_resnet" and config.query_mode == "none"
    assert config.id2label[1] == "person" and config.id2label[12] == "N/A"


def test_sine_embedding_matches_dino_at_full_width(fixture):
    """DINO's ``gen_sineembed_for_position`` (128 features per coordinate, d_model 256) on random anchors."""
    sine = fixture["sine_embedding"]
    assert_close(anchor_sine_embedding(sine["points"], 128), sine["dino"], "sine embedding", atol=1e-5)


def test_encoder_proposals_and_every_decoder_layer_match_dino(fixture):
    expected = fixture["eval"]
    out = eval_outputs(converted_model(fixture), fixture)
    assert_close(out.enc_outputs_class, expected["enc_logits"], "encoder proposal logits")
    assert_close(out.enc_outputs_coord, expected["enc_boxes"], "encoder proposal boxes")
    for layer in range(expected["decoder_logits"].shape[0]):
        assert_close(out.intermediate_logits[:, layer], expected["decoder_logits"][layer], f"decoder {layer} logits")
        assert_close(out.intermediate_boxes[:, layer], expected["decoder_boxes"][layer], f"decoder {layer} boxes")


def test_post_processed_detections_match_dino(fixture):
    """DINO's ``PostProcess`` (top 300 of Q x C sigmoid scores, xyxy in pixels) vs our image processor."""
    out = eval_outputs(converted_model(fixture), fixture)
    processor = SparseSemiDetrImageProcessor()
    ours = processor.post_process_object_detection(
        out, threshold=0.0, target_sizes=fixture["inputs"]["target_sizes"], top_k=300)
    for mine, dino in zip(ours, fixture["eval"]["detections"]):
        assert_close(mine["scores"], dino["scores"], "scores", atol=1e-5)
        assert torch.equal(mine["labels"], dino["labels"])
        assert_close(mine["boxes"], dino["boxes"], "boxes (pixels)", atol=1e-4 * 128)


def test_reference_from_normed_output_breaks_parity(fixture):
    """The parity test can fail: the pre-fix reference rule (box head on the normed output) moves layers >= 1."""
    expected = fixture["eval"]
    out = eval_outputs(converted_model(fixture, decoder_reference_from_normed=True), fixture)
    assert_close(out.intermediate_boxes[:, 0], expected["decoder_boxes"][0], "decoder 0 boxes")  # layer 0 unaffected
    diff = (out.intermediate_boxes[:, 1:] - expected["decoder_boxes"][1:].transpose(0, 1)).abs().max().item()
    assert diff > 10 * ATOL, diff  # 4e-3 on this fixture: 40x the parity tolerance
    with pytest.raises(AssertionError):
        assert_close(out.intermediate_boxes[:, -1], expected["decoder_boxes"][-1], "decoder last boxes")


def test_training_losses_with_denoising_match_dino(fixture):
    """Same number of targets per image (no padding slot in the denoising groups): every loss term matches."""
    expected = fixture["train"]["targets_equal"]
    out = train_outputs(converted_model(fixture), fixture, "targets_equal")
    meta = out.denoising_meta
    assert 2 * meta.num_groups * meta.pad_size == expected["dn_pad_size"]
    assert meta.num_groups == expected["dn_num_groups"]
    for layer in range(expected["decoder_logits"].shape[0]):
        assert_close(out.intermediate_logits[:, layer], expected["decoder_logits"][layer], f"train decoder {layer} logits")
        assert_close(out.intermediate_boxes[:, layer], expected["decoder_boxes"][layer], f"train decoder {layer} boxes")
        assert_close(out.dn_logits[:, layer], expected["dn_logits"][layer], f"denoising {layer} logits")
        assert_close(out.dn_boxes[:, layer], expected["dn_boxes"][layer], f"denoising {layer} boxes")
    errors = compare_losses(out.loss_dict, expected["losses"])
    assert len(errors) == 3 * (2 * 3 + 1)  # (matching + denoising) x 3 layers + encoder
    assert max(errors.values()) <= LOSS_RTOL, {k: v for k, v in errors.items() if v > LOSS_RTOL}
    weighted = out.loss.item()
    assert abs(weighted - expected["weighted_loss"].item()) <= LOSS_RTOL * abs(expected["weighted_loss"].item())


def test_padded_denoising_groups_outputs_match_dino(fixture):
    """3 and 1 targets: the padding slots of image 1 get DINO's zero content (converted label row), so all outputs
    and every loss match (the denoising classification loss, which the padding rule decides: next test)."""
    expected = fixture["train"]["targets_padded"]
    out = train_outputs(converted_model(fixture), fixture, "targets_padded")
    for layer in range(expected["decoder_logits"].shape[0]):
        assert_close(out.intermediate_boxes[:, layer], expected["decoder_boxes"][layer], f"train decoder {layer} boxes")
        assert_close(out.dn_logits[:, layer], expected["dn_logits"][layer], f"denoising {layer} logits")
        assert_close(out.dn_boxes[:, layer], expected["dn_boxes"][layer], f"denoising {layer} boxes")
    errors = compare_losses(out.loss_dict, expected["losses"], only=lambda key: "_ce_dn" not in key)
    assert max(errors.values()) <= LOSS_RTOL, {k: v for k, v in errors.items() if v > LOSS_RTOL}


def test_padded_denoising_classification_loss_matches_dino(fixture):
    """DINO treats every non-positive denoising query, padding slots included, as background
    (``denoising_padding_is_background``, the default; with ``False`` the padding slots carry no loss)."""
    expected = fixture["train"]["targets_padded"]
    out = train_outputs(converted_model(fixture), fixture, "targets_padded")
    errors = compare_losses(out.loss_dict, expected["losses"], only=lambda key: "_ce_dn" in key)
    assert max(errors.values()) <= LOSS_RTOL, errors


@pytest.mark.xfail(strict=True, reason=(
    "box_ops.py elementwise_box_iou / elementwise_generalized_box_iou divide by union.clamp(min=1e-7) and "
    "hull.clamp(min=1e-7); DINO (util/box_ops.py box_iou / generalized_box_iou) divides by (union + 1e-6) and "
    "(area + 1e-6). Same boxes give loss_giou_dn_0 0.1755531 (ours) vs 0.1755657 (DINO's formula), 7.2e-5 relative: "
    "inside the 1e-4 parity tolerance, but not exact."))
def test_giou_losses_match_dino_to_1e6(fixture):
    expected = fixture["train"]["targets_equal"]
    out = train_outputs(converted_model(fixture), fixture, "targets_equal")
    errors = compare_losses(out.loss_dict, expected["losses"], only=lambda key: "giou" in key)
    assert max(errors.values()) <= 1e-6, errors


def test_cli_converts_a_dino_checkpoint(fixture, tmp_path):
    """``python -m sparse_semi_detr_hf.convert_dino_to_hf`` on a DINO-style .pth (``model`` + ``args``)."""
    import argparse

    from transformers import AutoModelForObjectDetection, pipeline

    checkpoint = tmp_path / "dino_tiny.pth"
    torch.save({"model": dino_state_dict(fixture), "args": argparse.Namespace(**fixture["args"])}, checkpoint)
    folder = tmp_path / "hf"
    command = [sys.executable, "-m", "sparse_semi_detr_hf.convert_dino_to_hf", "--checkpoint_path", str(checkpoint),
               "--pytorch_dump_folder_path", str(folder)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "allow_missing_backbone" in refused.stderr
    done = subprocess.run(command + ["--allow_missing_backbone"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NO BACKBONE WEIGHTS" in done.stderr

    model = inject_features(AutoModelForObjectDetection.from_pretrained(folder), fixture)
    out = eval_outputs(model, fixture)
    assert_close(out.intermediate_boxes, fixture["eval"]["decoder_boxes"].transpose(0, 1), "CLI model boxes")
    assert_close(out.intermediate_logits, fixture["eval"]["decoder_logits"].transpose(0, 1), "CLI model logits")

    detector = pipeline("object-detection", model=str(folder))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    detections = detector(image, threshold=0.0)
    assert detections and {"score", "label", "box"} <= set(detections[0])


def test_coco80_keeps_the_rows_of_the_80_coco_ids(fixture, tmp_path):
    """``--coco80``: class heads keep rows of the sorted COCO ids, the label embedding those rows + its padding row,
    labels are COCO's names in the order this package's COCO loader numbers them; the model loads and runs."""
    from transformers import AutoModelForObjectDetection

    from sparse_semi_detr_hf.convert_dino_to_hf import COCO80_IDS, COCO_NAMES, slice_to_coco80

    original = dino_state_dict(fixture)
    config = build_config_from_dino(original, fixture["args"], backbone="test_resnet")
    converted = convert_dino_state_dict(original)
    sliced, sliced_config = slice_to_coco80(converted, config)
    assert sliced_config.num_labels == 80 and sliced_config.id2label[0] == "person"
    assert [sliced_config.id2label[i] for i in range(80)] == [COCO_NAMES[c] for c in sorted(COCO_NAMES)]
    rows = torch.tensor(COCO80_IDS)
    for key in ("model.class_head.weight", "model.class_head.bias", "model.query_selection.class_head.bias"):
        assert torch.equal(sliced[key], converted[key][rows])
    assert torch.equal(sliced["model.label_embedding.weight"][:80], converted["model.label_embedding.weight"][rows])
    assert torch.equal(sliced["model.label_embedding.weight"][80], converted["model.label_embedding.weight"][91])
    model = SparseSemiDetrForObjectDetection(sliced_config)
    missing, unexpected = model.load_state_dict(sliced, strict=False)
    assert not unexpected and all(key.startswith("model.backbone.") for key in missing)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        out = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()(pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, config.num_queries, 80)
    with pytest.raises(ValueError, match="91"):
        slice_to_coco80(converted, build_config_from_dino(original, fixture["args"], backbone="test_resnet",
                                                          num_labels=80))
