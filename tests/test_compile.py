"""torch.compile on the detector: no graph break in the encoder, the decoder or the whole eval forward; the compiled
training step equals eager; ``encode`` / ``decode`` move no data between host and device (no host sync).

CPU backends: ``"eager"`` (Dynamo capture only: ``fullgraph=True`` fails on any graph break) and ``"aot_eager"``
(also traces the forward and backward ATen graphs, as inductor would, without inductor's C++ compile, which takes
over a minute per unit on a 2-core CPU).
"""

import pytest
import torch
from conftest import random_targets, tiny_config_kwargs
from torch.overrides import TorchFunctionMode

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection
from sparse_semi_detr_hf.deformable_attention import MultiScaleDeformableAttention
from sparse_semi_detr_hf.modeling_sparse_semi_detr import _shapes_tensor
from sparse_semi_detr_hf.query_groups import QueryGroup

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(**overrides) -> SparseSemiDetrForObjectDetection:
    torch.manual_seed(0)
    return SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(**overrides)))


def make_inputs(device="cpu", height=64, width=96):
    pixel_values = torch.randn(2, 3, height, width, device=device)
    pixel_mask = torch.ones(2, height, width, dtype=torch.long, device=device)
    pixel_mask[1, :, width * 3 // 4:] = 0  # second image padded on the right
    return pixel_values, pixel_mask


def extra_group(device="cpu") -> QueryGroup:
    """A group of 3 queries per image, the second image with one padding slot (exercises the attention mask)."""
    generator = torch.Generator().manual_seed(1)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    content = torch.randn(2, 3, 32, generator=generator)
    anchors = torch.rand(2, 3, 4, generator=generator) * 0.5 + 0.25
    return QueryGroup(content.to(device), anchors.to(device), valid.to(device))


def test_whole_eval_forward_is_one_graph():
    """Backbone, neck, encoder, query selection, decoder and heads: one Dynamo graph, same outputs as eager."""
    model = make_model().eval()
    pixel_values, pixel_mask = make_inputs()
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask)
        out = torch.compile(model, backend="eager", fullgraph=True)(pixel_values, pixel_mask)
    for name in ("logits", "pred_boxes", "enc_outputs_class", "enc_outputs_coord", "intermediate_hidden_states"):
        torch.testing.assert_close(out[name], expected[name], **TOL)


def test_dynamic_encoder_and_decoder_serve_every_image_size():
    """With ``dynamic=True`` the compiled encoder and decoder are traced once and reused for another image size
    (sides over 64 px, so that no feature level has size 1, which Dynamo specializes)."""
    model = make_model().eval()
    inputs = [make_inputs(height=96, width=128), make_inputs(height=128, width=80)]
    with torch.no_grad():
        expected = [model.model.decode(model.model.encode(*batch)) for batch in inputs]
        model.model.encoder.compile(backend="eager", fullgraph=True, dynamic=True)
        model.model.decoder.compile(backend="eager", fullgraph=True, dynamic=True)
        for index, batch in enumerate(inputs):
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                decoded = model.model.decode(model.model.encode(*batch))
            torch.testing.assert_close(decoded.logits, expected[index].logits, **TOL)
            torch.testing.assert_close(decoded.boxes, expected[index].boxes, **TOL)


def _training_step(model, pixel_values, pixel_mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(pixel_values, pixel_mask, labels=labels, extra_query_groups=[extra_group()],
                generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_compiled_encoder_and_decoder_training_step_matches_eager():
    """Encoder and decoder compiled with ``fullgraph=True`` (aot_eager) inside a training step with denoising queries
    and an extra query group: same loss, group outputs and gradients as eager; state-dict keys unchanged."""
    model = make_model().train()
    pixel_values, pixel_mask = make_inputs()
    labels = random_targets(2, [3, 1], generator=torch.Generator().manual_seed(2))
    keys = list(model.state_dict())
    expected, expected_grads = _training_step(model, pixel_values, pixel_mask, labels)
    model.model.encoder.compile(backend="aot_eager", fullgraph=True)
    model.model.decoder.compile(backend="aot_eager", fullgraph=True)
    out, grads = _training_step(model, pixel_values, pixel_mask, labels)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(out.loss, expected.loss, **TOL)
    torch.testing.assert_close(out.dn_boxes, expected.dn_boxes, **TOL)
    torch.testing.assert_close(out.extra_group_outputs[0].logits, expected.extra_group_outputs[0].logits, **TOL)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOL, msg=lambda text, name=name: f"{name}: {text}")


class HostTransferAudit(TorchFunctionMode):
    """Records calls that copy Python data or CPU tensors to another device, or read a tensor back to the host."""

    READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        result = func(*args, **kwargs)
        from_host = name in ("tensor", "as_tensor") and not isinstance(args[0], torch.Tensor)
        from_host |= name in ("to", "copy_", "cuda") and isinstance(args[0], torch.Tensor) and any(
            isinstance(arg, torch.Tensor) and arg.device.type == "cpu" for arg in args
        )
        if name in self.READS or (from_host and isinstance(result, torch.Tensor) and result.device.type != "cpu"):
            self.events.append(name)
        if name == "__setitem__" and _host_scalar_into_advanced_index(*args[:3]):
            self.events.append("__setitem__ of a Python scalar at tensor indices")
        return result


def _host_scalar_into_advanced_index(target, index, value) -> bool:
    """``target[tensor_index] = 1.0`` on a device tensor: the scalar is copied from the host (a sync on CUDA);
    basic indexing (slices, ints) fills on the device instead."""
    indices = index if isinstance(index, tuple) else (index,)
    return (target.device.type != "cpu" and isinstance(value, (bool, int, float))
            and any(isinstance(item, torch.Tensor) for item in indices))


def test_encode_and_decode_make_no_host_transfer():
    """On the meta device (standing in for CUDA), ``encode`` and ``decode`` (with denoising queries and an extra
    group) copy nothing from the host and read nothing back; every such transfer would be a host sync on CUDA."""
    model = make_model().train().to("meta")
    pixel_values, pixel_mask = make_inputs("meta")
    labels = [{key: value.to("meta") for key, value in target.items()} for target in random_targets(2, [3, 1])]
    groups = [extra_group("meta")]
    with torch.no_grad(), HostTransferAudit() as audit:
        state = model.model.encode(pixel_values, pixel_mask)
        model.model.decode(state, labels, groups)
    assert audit.events == []
    with HostTransferAudit() as audit:  # the audit does catch the transfer _shapes_tensor avoids
        torch.as_tensor(state.shapes_list, dtype=torch.long, device="meta")
    assert audit.events == ["as_tensor"]
    mask = torch.zeros(3, 3, dtype=torch.bool, device="meta")
    with HostTransferAudit() as audit:  # and a host scalar written at tensor indices (found on an H100)
        mask[:, 1:] = True
        mask[torch.arange(2, device="meta"), torch.arange(2, device="meta")] = True
    assert audit.events == ["__setitem__ of a Python scalar at tensor indices"]


def test_shapes_tensor_matches_as_tensor():
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2)]
    built = _shapes_tensor(shapes, torch.device("cpu"))
    assert built.dtype == torch.long
    torch.testing.assert_close(built, torch.as_tensor(shapes, dtype=torch.long), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["pytorch", "auto"])
def test_encode_and_decode_do_not_synchronize_on_cuda(backend):
    model = make_model(deformable_attention_backend=backend).eval().cuda()
    pixel_values, pixel_mask = make_inputs("cuda")
    group = extra_group("cuda")  # made before the check: its host-to-device copies are the test's, not the model's
    with torch.no_grad():
        model.model.decode(model.model.encode(pixel_values, pixel_mask))  # warm-up: lazy CUDA/cuBLAS set-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.model.decode(model.model.encode(pixel_values, pixel_mask), extra_query_groups=[group])
        finally:
            torch.cuda.set_sync_debug_mode("default")


class _Captured(Exception):
    pass


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_triton_attention_is_traced_into_one_graph(monkeypatch):
    """Dynamo traces the Triton kernel launches (forward and backward of the autograd Function) into one graph.

    Nothing runs: the backend records the graph and stops. On CPU, Dynamo's "is there a Triton GPU" gate is
    opened and ``TRITON_INTERPRET`` set after the kernels were defined (they stay compiled ``JITFunction``s), only
    so that the kernel module accepts CPU tensors.
    """
    triton = pytest.importorskip("triton")
    from sparse_semi_detr_hf import deformable_attention_triton as kernels

    if not isinstance(kernels._msda_fwd_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("Triton kernels were defined in interpreter mode")
    if not torch.cuda.is_available():
        import torch.utils._triton as torch_triton

        monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        raise _Captured

    attention = MultiScaleDeformableAttention(16, 2, 2, 2, backend="triton")
    shapes_list = [(4, 4), (2, 2)]
    spatial_shapes = torch.tensor(shapes_list)
    start_index = torch.tensor([0, 16])
    query, value = torch.randn(1, 5, 16, requires_grad=True), torch.randn(1, 20, 16, requires_grad=True)
    reference = torch.rand(1, 5, 2, 4)
    compiled = torch.compile(attention, backend=capture, fullgraph=True)
    with pytest.raises(Exception, match="_Captured"):  # torch wraps it in BackendCompilerFailed
        compiled(query, reference, value, spatial_shapes, start_index, None, shapes_list)
    (graph,) = graphs  # fullgraph=True: a graph break would have raised before the backend saw any graph
    assert "autograd_function_apply" in graph.code
    bodies = dict(graph.named_children())
    assert any("triton_kernel_wrapper" in body.code for name, body in bodies.items() if name.startswith("fwd_body"))
    assert any("triton_kernel_wrapper" in body.code for name, body in bodies.items() if name.startswith("bwd_body"))
