"""CudaGraphDetector: the eval forward replayed from CUDA graphs equals the eager forward (GPU tests skipped on CPU)."""

import pytest
import torch
from conftest import tiny_config_kwargs

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection
from sparse_semi_detr_hf.cuda_graphs import CudaGraphDetector, clone_tensors

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_model(device="cpu", **overrides) -> SparseSemiDetrForObjectDetection:
    torch.manual_seed(0)
    return SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(**overrides))).to(device).eval()


def make_inputs(device="cpu", batch=2, height=64, width=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator).to(device)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=device)
    pixel_mask[-1, :, width * 3 // 4:] = 0
    return pixel_values, pixel_mask


def assert_same_detections(actual, expected, atol):
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=atol)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=0, atol=atol)
    torch.testing.assert_close(actual.intermediate_logits, expected.intermediate_logits, rtol=0, atol=atol)
    torch.testing.assert_close(actual.intermediate_boxes, expected.intermediate_boxes, rtol=0, atol=atol)


def test_cpu_falls_back_to_the_eager_forward():
    model = make_model()
    pixel_values, pixel_mask = make_inputs()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    actual = CudaGraphDetector(model)(pixel_values, pixel_mask)
    assert type(actual) is type(expected)
    assert_same_detections(actual, expected, atol=0)


def test_refuses_what_a_fixed_graph_cannot_do():
    model = make_model()
    detector = CudaGraphDetector(model)
    pixel_values, pixel_mask = make_inputs()
    with pytest.raises(ValueError, match="labels"):
        detector(pixel_values, pixel_mask, labels=[{"class_labels": torch.zeros(0), "boxes": torch.zeros(0, 4)}])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        detector(pixel_values, pixel_mask)
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphDetector(model, warmup=0)


def test_clone_tensors_copies_every_tensor_of_a_model_output():
    model = make_model()
    pixel_values, _ = make_inputs()
    with torch.no_grad():
        output = model(pixel_values=pixel_values)
    copied = clone_tensors(output)
    assert type(copied) is type(output) and list(copied.keys()) == list(output.keys())
    assert copied.logits.data_ptr() != output.logits.data_ptr()
    assert copied.intermediate_boxes.data_ptr() != output.intermediate_boxes.data_ptr()
    assert copied.intermediate_boxes.stride() == output.intermediate_boxes.stride()  # a batch-first view stays one
    torch.testing.assert_close(copied.pred_boxes, output.pred_boxes, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["pytorch", "auto"])
def test_replay_equals_the_eager_forward_on_new_inputs(backend):
    model = make_model("cuda", deformable_attention_backend=backend)
    detector = CudaGraphDetector(model)
    for seed in (0, 1, 2):  # seed 0 captures, 1 and 2 replay with inputs copied into the graph's buffers
        pixel_values, pixel_mask = make_inputs("cuda", seed=seed)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        assert_same_detections(detector(pixel_values, pixel_mask), expected, atol=1e-4)
    assert len(detector._graphs) == 1


@pytest.mark.gpu
@needs_cuda
def test_each_shape_gets_its_graph_and_outputs_survive_the_next_call():
    model = make_model("cuda")
    detector = CudaGraphDetector(model, max_graphs=2)
    small, large = make_inputs("cuda", height=64, width=96), make_inputs("cuda", height=96, width=128, seed=3)
    first = detector(*small)
    detector(*large)
    detector(small[0] * 0.5, small[1])
    with torch.no_grad():
        expected = model(pixel_values=small[0], pixel_mask=small[1])
    assert_same_detections(first, expected, atol=1e-4)
    assert len(detector._graphs) == 2
    detector(small[0], None)  # a third key drops the oldest graph
    assert len(detector._graphs) == 2


@pytest.mark.gpu
@needs_cuda
def test_bf16_replay_equals_eager_autocast_and_follows_the_weights():
    model = make_model("cuda")
    detector = CudaGraphDetector(model, autocast_dtype=torch.bfloat16)
    pixel_values, pixel_mask = make_inputs("cuda")
    before = detector(pixel_values, pixel_mask)
    with torch.no_grad():
        for parameter in model.parameters():  # e.g. an EMA update: the replay reads the weights in place
            parameter.mul_(1.01)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    after = detector(pixel_values, pixel_mask)
    assert not torch.equal(before.logits, after.logits)
    assert_same_detections(after, expected, atol=1e-2)
