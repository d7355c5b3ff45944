"""Inference with the detector's eval forward replayed from CUDA graphs.

At batch 1 the forward is launch-bound: the GPU waits for the Python side to queue hundreds of small kernels
(bf16 autocast adds a cast kernel in front of most of them, which is why bf16 was slower than fp32 at batch 1).
A CUDA graph records the kernels of one call once and replays them with a single launch. The encoder and decoder
make no host-device transfer (``tests/test_compile.py``), so the whole forward without ``labels`` can be captured.

A graph is bound to one input shape, dtype and memory layout: :class:`CudaGraphDetector` captures one graph per
``(pixel_values shape, dtype, pixel_mask given)`` on first use and replays it afterwards. Pad images to a fixed
canvas (the image processor's ``pad_size``) so that every call replays the same graph.
"""

from typing import Any

import torch
from torch import Tensor, nn


def clone_tensors(value: Any) -> Any:
    """Copy every tensor inside ``value`` (tensors, lists, tuples, dicts, transformers ``ModelOutput``)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):  # ModelOutput is an OrderedDict: rebuild it from its set fields
        return type(value)(**{key: clone_tensors(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tensors(item) for item in value)
    return value


class _CapturedForward:
    """One captured forward: static inputs, the graph, and the static outputs it writes."""

    def __init__(self, run, pixel_values: Tensor, pixel_mask: Tensor | None, warmup: int, pool) -> None:
        self.pixel_values = pixel_values.clone()
        self.pixel_mask = None if pixel_mask is None else pixel_mask.clone()
        side = torch.cuda.Stream(device=pixel_values.device)
        side.wait_stream(torch.cuda.current_stream(pixel_values.device))
        with torch.cuda.stream(side):  # warm-up off the default stream (allocator, Triton/cuDNN autotuning)
            for _ in range(warmup):
                run(self.pixel_values, self.pixel_mask)
        torch.cuda.current_stream(pixel_values.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = run(self.pixel_values, self.pixel_mask)

    def replay(self, pixel_values: Tensor, pixel_mask: Tensor | None) -> Any:
        self.pixel_values.copy_(pixel_values)
        if pixel_mask is not None:
            self.pixel_mask.copy_(pixel_mask)
        self.graph.replay()
        return self.outputs


class CudaGraphDetector(nn.Module):
    """Eval-mode detector whose forward is replayed from CUDA graphs (eager on a non-CUDA device).

    ``CudaGraphDetector(model, autocast_dtype=torch.bfloat16)(pixel_values, pixel_mask)`` returns what
    ``model(pixel_values=..., pixel_mask=...)`` returns in eval mode without labels (a
    ``SparseSemiDetrObjectDetectionOutput``), with the same values: a replay runs the same kernels on the same
    inputs. Each new ``(shape, dtype, mask given)`` costs ``warmup`` eager calls and one capture; at most
    ``max_graphs`` graphs are kept (the oldest is dropped). Outputs are copies, so they survive the next call
    unless ``copy_outputs=False`` (then the next replay overwrites them). The wrapped model's weights are used in
    place: loading new weights into it (``load_state_dict``, an EMA update) is seen by the next replay.

    Works with ``image_processor.post_process_object_detection`` like the model's own outputs.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None, warmup: int = 2,
                 max_graphs: int = 8, copy_outputs: bool = True) -> None:
        super().__init__()
        if warmup < 1:
            raise ValueError("warmup must be >= 1: the first calls autotune kernels and must not be captured.")
        self.model = model.eval()
        self.autocast_dtype = autocast_dtype
        self.warmup, self.max_graphs, self.copy_outputs = warmup, max_graphs, copy_outputs
        self._graphs: dict[tuple, _CapturedForward] = {}
        self._pool = None

    @property
    def config(self):
        return self.model.config

    def _run(self, pixel_values: Tensor, pixel_mask: Tensor | None) -> Any:
        with torch.no_grad(), torch.autocast(pixel_values.device.type, dtype=self.autocast_dtype or torch.float32,
                                             enabled=self.autocast_dtype is not None, cache_enabled=False):
            return self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, return_dict=True)

    def _captured(self, pixel_values: Tensor, pixel_mask: Tensor | None) -> _CapturedForward:
        key = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device,
               None if pixel_mask is None else (tuple(pixel_mask.shape), pixel_mask.dtype))
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = _CapturedForward(self._run, pixel_values, pixel_mask, self.warmup, self._pool)
        return self._graphs[key]

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None, **kwargs) -> Any:
        """``pixel_values (B, 3, H, W)``, ``pixel_mask (B, H, W)`` (1 = real pixel, optional) -> detector output.

        Other keyword arguments (``labels``, ``output_hidden_states``, ...) are refused: the graph holds one fixed
        computation, the plain eval forward.
        """
        unused = sorted(key for key, value in kwargs.items() if value is not None)
        if unused:
            raise ValueError(f"CudaGraphDetector only runs the eval forward; got {unused}. Call the model itself.")
        if self.model.training:
            raise ValueError("CudaGraphDetector runs the eval forward; the wrapped model was put in training mode.")
        if pixel_values.device.type != "cuda":
            return self._run(pixel_values, pixel_mask)
        outputs = self._captured(pixel_values, pixel_mask).replay(pixel_values, pixel_mask)
        return clone_tensors(outputs) if self.copy_outputs else outputs

    def reset(self) -> None:
        """Drop every captured graph (frees their memory pool once no output refers to it)."""
        self._graphs.clear()
        self._pool = None
