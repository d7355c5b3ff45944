"""``examples/train_ssod.py``: one tiny in-process run through ``main([...])`` (results, exported model,
checkpoints, TensorBoard) and a two-process DDP run through ``accelerate launch --cpu`` (gloo)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoImageProcessor, AutoModelForObjectDetection

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_ssod.py"
METRICS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
TINY = (
    "--synthetic_num_train 20 --synthetic_num_val 4 --backbone test_resnet --d_model 32 --encoder_layers 1 "
    "--decoder_layers 1 --ffn_dim 64 --attention_heads 2 --num_queries 20 --num_denoising_queries 10 "
    "--num_detections 20 --qrm_reduced_dim 16 --config_overrides qrm_attention_heads=2 --image_scales 64,80 "
    "--max_image_size 96 --eval_image_size 64 --labeled_batch_size 1 --unlabeled_batch_size 2 --num_workers 0 "
    "--eval_batch_size 4 --logging_steps 1"
).split()
DDP_TIMEOUT_S = 420


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_script():
    spec = importlib.util.spec_from_file_location("train_ssod", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scalars(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(accumulator.Scalars(tag))
    return tags


def test_main_writes_results_model_checkpoints_and_tensorboard(tmp_path):
    output = tmp_path / "run"
    results = _load_script().main([
        *TINY, "--output_dir", str(output), "--max_steps", "2", "--one_to_many_steps", "1", "--eval_steps", "1",
        "--checkpointing_steps", "1", "--report_to", "tensorboard", "--synthetic_cache_dir", str(tmp_path / "cache"),
    ])

    saved = json.loads((output / "results.json").read_text())
    assert saved["steps"] == results["steps"] == 2
    assert set(saved["final"]["student"]) == set(saved["final"]["teacher"]) == METRICS
    assert set(saved["best"]["metrics"]) == METRICS and saved["best"]["model"] in ("student", "teacher")
    assert [r["step"] for r in saved["history"]] == [1, 2]
    # the evaluation after step 1 = T1 sees weights trained one-to-many (evaluated with its NMS)
    assert [r["stage"] for r in saved["history"]] == ["one_to_many", "one_to_one"]
    assert saved["seconds_per_step"] > 0 and saved["num_processes"] == 1
    assert {"loss", "loss_sup", "loss_unsup", "pseudo_per_image"} <= set(saved["last_logged"])

    assert sorted(os.listdir(output / "checkpoints")) == ["checkpoint-1", "checkpoint-2"]

    # the final teacher in output_dir itself, as after transformers' Trainer; its card validates
    final = AutoModelForObjectDetection.from_pretrained(output)
    assert AutoImageProcessor.from_pretrained(output).size == AutoImageProcessor.from_pretrained(
        output / "best_model").size
    card = ModelCard.load(output / "README.md")
    assert card.data.model_name == "run" and card.data.pipeline_tag == "object-detection"
    ModelCardData(**card.data.to_dict())  # the metadata validates offline
    # a checkpoint's teacher / student, exported with the documented command, load and match
    exporter = _load_example("export_checkpoint")
    teacher_dir = exporter.main([str(output / "checkpoints" / "checkpoint-2"), "--output_dir", str(tmp_path / "t")])
    exported = AutoModelForObjectDetection.from_pretrained(teacher_dir)
    for (name, a), b in zip(final.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name  # the final teacher == the last checkpoint's teacher
    student_dir = exporter.main([str(output / "checkpoints" / "checkpoint-2"), "--model", "student", "--output_dir",
                                 str(tmp_path / "s")])
    assert AutoImageProcessor.from_pretrained(student_dir).size == AutoImageProcessor.from_pretrained(output).size
    student = AutoModelForObjectDetection.from_pretrained(student_dir).state_dict()
    assert any(not torch.equal(student[k], v) for k, v in exported.state_dict().items())

    processor = AutoImageProcessor.from_pretrained(output / "best_model")
    model = AutoModelForObjectDetection.from_pretrained(output / "best_model").eval()
    assert type(model).__name__ == "SparseSemiDetrForObjectDetection"
    assert model.config.num_labels == 3 and model.config.d_model == 32  # the preset's 3 synthetic classes
    image = Image.new("RGB", (90, 70), (120, 30, 200))
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    detections = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(70, 90)],
                                                         top_k=model.config.num_detections)[0]
    assert detections["boxes"].shape == (20, 4) and detections["labels"].max() < 3

    scalars = _scalars(output)
    assert {"loss", "loss_sup", "loss_unsup", "student/AP", "teacher/AP", "student/AP50"} <= scalars.keys()
    assert [event.step for event in scalars["loss"]] == [1, 2]
    assert [event.step for event in scalars["student/AP"]] == [1, 2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    """Gloo DDP without ``find_unused_parameters``: two steps (the second forward fails if a parameter got no
    gradient in the first; the untrained teacher gives no pseudo-label, so the query module's output is empty),
    evaluation gathered over both ranks, one results.json.

    ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple launcher; several CPU
    processes need mpirun), so two CPU processes are started the torchrun way: ``--multi_gpu`` with
    ``ACCELERATE_USE_CPU=1``, which makes accelerate pick MULTI_CPU / gloo.
    """
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(SCRIPT),
        *TINY, "--output_dir", str(output), "--max_steps", "2", "--one_to_many_steps", "1", "--eval_steps", "100",
        "--checkpointing_steps", "100", "--synthetic_cache_dir", str(tmp_path / "cache"),
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    try:
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        tail = (error.stdout or b"")[-3000:], (error.stderr or b"")[-3000:]
        pytest.fail(f"DDP run did not finish in {DDP_TIMEOUT_S} s (hang?). Output tail: {tail}")
    assert run.returncode == 0, f"DDP run failed ({run.returncode}):\n{run.stderr[-6000:]}"
    results = json.loads((output / "results.json").read_text())
    assert results["num_processes"] == 2 and results["steps"] == 2
    assert set(results["final"]["student"]) == METRICS and set(results["final"]["teacher"]) == METRICS
    assert (output / "best_model" / "model.safetensors").is_file()
    assert os.listdir(output / "checkpoints") == ["checkpoint-2"]
