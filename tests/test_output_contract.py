"""The output contract of transformers' detection models: tensors only in what ``to_tuple()`` and ``Trainer`` see,
``config.return_dict`` honoured, ``output_hidden_states`` answered, ``output_attentions`` refused with a reason,
gradient checkpointing available — and ``transformers.Trainer`` trains and evaluates with a ``compute_metrics``
that calls ``post_process_object_detection`` and computes COCO mAP (the object-detection task guide's flow)."""

import numpy as np
import pytest
import torch
from conftest import random_targets, tiny_config_kwargs
from datasets import Dataset
from PIL import Image
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import EvalPrediction

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection, SparseSemiDetrImageProcessor
from sparse_semi_detr_hf.training.evaluation import evaluate_detections


def _model(**overrides):
    torch.manual_seed(0)
    return SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(**overrides)))


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 64, 80, generator=generator), torch.ones(batch, 64, 80, dtype=torch.long)


def test_outputs_hold_tensors_only_and_return_dict_follows_the_config():
    model = _model().train()
    pixel_values, pixel_mask = _inputs()
    out = model(pixel_values, pixel_mask, labels=random_targets(2, [2, 1]))
    assert out.denoising_meta is not None and out.encoder_state is not None  # internal state, as attributes
    assert "denoising_meta" not in out.keys() and "encoder_state" not in out.keys()

    def tensors_only(value):
        if isinstance(value, torch.Tensor):
            return True
        if isinstance(value, dict):
            return all(tensors_only(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return all(tensors_only(v) for v in value)
        return False

    assert tensors_only(out.to_tuple())
    model.config.return_dict = False
    as_tuple = model(pixel_values, pixel_mask)
    assert isinstance(as_tuple, tuple) and tensors_only(as_tuple)


def test_every_eval_output_is_batch_first():
    """transformers' pipelines (``batch_size=N``) and ``Trainer`` slice every output field on dim 0 as the batch.
    Bug fixed: per-layer outputs were ``(num_layers, B, ...)`` and ``auxiliary_outputs`` a list of
    ``num_layers - 1`` dicts, so ``pipeline(..., batch_size=N)`` failed with an IndexError once N >= num_layers."""
    model = _model().eval()
    pixel_values, pixel_mask = _inputs(batch=3)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
    assert out.auxiliary_outputs is None and out.loss is None  # as transformers' DETR models: with labels only
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.shape[0] == 3, key
    layers = model.config.decoder_layers
    torch.testing.assert_close(out.intermediate_logits[:, -1], out.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.intermediate_boxes[:, -1], out.pred_boxes, rtol=0, atol=0)
    torch.testing.assert_close(out.intermediate_hidden_states[:, -1], out.last_hidden_state, rtol=0, atol=0)
    with torch.no_grad():
        hidden = model(pixel_values, pixel_mask, output_hidden_states=True).decoder_hidden_states
    assert len(hidden) == layers
    for layer, state in enumerate(hidden):
        torch.testing.assert_close(state, out.intermediate_hidden_states[:, layer], rtol=0, atol=0)
    with torch.no_grad():
        trained = model(pixel_values, pixel_mask, labels=random_targets(3, [2, 1, 0]))
    assert len(trained.auxiliary_outputs) == layers - 1
    torch.testing.assert_close(trained.auxiliary_outputs[0]["logits"], out.intermediate_logits[:, 0])


def test_hidden_states_attentions_and_gradient_checkpointing():
    model = _model().eval()
    pixel_values, pixel_mask = _inputs()
    out = model(pixel_values, pixel_mask, output_hidden_states=True)
    assert len(out.encoder_hidden_states) == model.config.encoder_layers + 1
    assert out.encoder_hidden_states[-1].shape == out.encoder_last_hidden_state.shape
    assert model(pixel_values, pixel_mask).encoder_hidden_states is None
    with pytest.raises(NotImplementedError, match="deformable attention"):
        model(pixel_values, pixel_mask, output_attentions=True)

    labels = random_targets(2, [2, 1], generator=torch.Generator().manual_seed(3))
    plain = _model().train()
    checkpointed = _model().train()
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # newer transformers: the old name is deprecated
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 5.17
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert getattr(checkpointed, "is_activation_checkpointing", None) or checkpointed.is_gradient_checkpointing
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)  # the denoising noise
        loss = model(pixel_values, pixel_mask, labels=labels).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def _cppe5_like(count: int) -> Dataset:
    rng = np.random.default_rng(0)
    rows = {"image_id": [], "image": [], "objects": []}
    for index in range(count):
        height, width = (int(v) for v in rng.integers(50, 80, 2))
        pixels = np.full((height, width, 3), 30, np.uint8)
        x, y, w, h = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20)), 18, 16
        pixels[y:y + h, x:x + w] = (220, 200, 40)
        rows["image_id"].append(index)
        rows["image"].append(Image.fromarray(pixels))
        rows["objects"].append({"bbox": [[x, y, w, h]], "category": [index % 3], "area": [float(w * h)]})
    return Dataset.from_dict(rows)


def _coco_ground_truth(dataset: Dataset) -> dict:
    images, annotations = [], []
    for row in dataset:
        images.append({"id": row["image_id"], "width": row["image"].width, "height": row["image"].height})
        for box, category, area in zip(row["objects"]["bbox"], row["objects"]["category"], row["objects"]["area"]):
            annotations.append({"id": len(annotations) + 1, "image_id": row["image_id"], "category_id": category,
                                "bbox": box, "area": area, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in enumerate("abc")]}


def test_transformers_trainer_trains_and_evaluates_with_compute_metrics(tmp_path):
    """The task guide's loop: COCO-detection annotations through the image processor, a collate, Trainer.train,
    then Trainer.evaluate with a compute_metrics that post-processes the predictions (finite loss, metrics back)."""
    # the guide's processor settings and transform (per batch, COCO-detection annotations, pixel_mask kept) ...
    processor = SparseSemiDetrImageProcessor(size={"max_height": 96, "max_width": 96}, do_pad=True,
                                             pad_size={"height": 96, "width": 96})
    model = _model(id2label={0: "a", 1: "b", 2: "c"})

    def transform(batch):
        annotations = [{"image_id": image_id, "annotations": [
            {"bbox": box, "category_id": category, "area": area, "iscrowd": 0}
            for box, category, area in zip(objects["bbox"], objects["category"], objects["area"])]}
            for image_id, objects in zip(batch["image_id"], batch["objects"])]
        return processor(images=batch["image"], annotations=annotations, return_tensors="pt")

    def collate(batch):  # ... and its collate_fn, verbatim
        data = {}
        data["pixel_values"] = torch.stack([x["pixel_values"] for x in batch])
        data["labels"] = [x["labels"] for x in batch]
        if "pixel_mask" in batch[0]:
            data["pixel_mask"] = torch.stack([x["pixel_mask"] for x in batch])
        return data

    train = _cppe5_like(8).with_transform(transform)
    evaluation = _cppe5_like(4).with_transform(transform)
    seen = {}

    ground_truth = _coco_ground_truth(_cppe5_like(4))

    def metrics(evaluation_prediction: EvalPrediction) -> dict:
        """The guide's compute_metrics: post-process with the original sizes, then COCO mAP (pycocotools here)."""
        predictions, targets = evaluation_prediction.predictions, evaluation_prediction.label_ids
        detections = []
        for batch, batch_targets in zip(predictions, targets):
            logits, boxes = torch.as_tensor(batch[1]), torch.as_tensor(batch[2])
            sizes = [[int(v) for v in target["orig_size"]] for target in batch_targets]
            results = processor.post_process_object_detection(
                {"logits": logits, "pred_boxes": boxes}, threshold=0.0, target_sizes=sizes)
            detections += [{"image_id": target["image_id"], **result}
                           for target, result in zip(batch_targets, results)]
        seen["detections"] = detections
        return evaluate_detections(ground_truth, detections)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                             max_steps=2, learning_rate=1e-4, remove_unused_columns=False, report_to=[],
                             eval_do_concat_batches=False, use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=collate, compute_metrics=metrics)
    history = trainer.train()
    assert np.isfinite(history.training_loss)
    result = trainer.evaluate()
    assert np.isfinite(result["eval_loss"])
    assert {"eval_AP", "eval_AP50", "eval_APs"} <= set(result) and 0.0 <= result["eval_AP"] <= 1.0
    assert len(seen["detections"]) == 4 and all(len(d["scores"]) > 0 for d in seen["detections"])
    widths = {int(d["boxes"][:, 2].max()) for d in seen["detections"]}
    assert max(widths) <= 80  # boxes in each image's original pixels (cppe-5-like images are 50..80 wide)
