"""Build ``tests/fixtures/dino_parity.pt``: a tiny random DINO from the ORIGINAL IDEA-Research code and its outputs.

    OMP_NUM_THREADS=1 python benchmarks/make_dino_parity_fixture.py --dino_path /work/dino_src \
        --output tests/fixtures/dino_parity.pt

The original code is imported from ``--dino_path`` (read-only; nothing of it is copied into this package). It runs on
CPU: the CUDA extension ``MultiScaleDeformableAttention`` is replaced in ``sys.modules`` by a stub, DINO's attention
function by its own pure-PyTorch ``ms_deform_attn_core_pytorch``, and ``Tensor.cuda`` / ``.to("cuda")`` (hard-coded in
``dn_components.py`` and the criterion) are redirected to the CPU, all at run time.

A ResNet-50 trunk would not fit in the fixture, so both models get the SAME fixed multi-scale backbone maps: DINO's
``Joiner`` is replaced by :class:`InjectedBackbone` (same masks and sine position embedding as DINO's), and the test
patches our ``model.model.backbone``. Channels ``[48, 192, 96]`` are those of timm's ``test_resnet`` (strides 8/16/32),
so the converted checkpoint loads into a real ``SparseSemiDetrForObjectDetection``.

Determinism: seeded; label and box noise of the denoising queries are 0 in both models (DINO draws its noise with
``torch.rand_like`` in its own order, ours with a generator), so the denoising queries are exactly the ground truth
boxes and labels. Dropout is 0, so train mode is deterministic.

Saved (torch.save dict, < 2 MiB): ``state_dict`` (DINO keys, no backbone weights), ``args`` (DINO's args as a dict),
``inputs`` (pixel_values / pixel_mask / features / targets / target_sizes), ``eval`` and ``train`` outputs, ``meta``.
"""

import argparse
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_DIM = 64
BACKBONE_CHANNELS = [48, 192, 96]  # timm "test_resnet", out_indices (2, 3, 4)
IMAGE_SIZE = (96, 128)  # padded canvas (H, W)
VALID_SIZES = [(96, 128), (80, 104)]  # real pixels of each image (image 1 is padded bottom/right)
DN_NUMBER = 50  # DINO doubles it (100) and then divides by 2 * max targets: 100 // 6 = 16 groups (ours: 50 // 3)


def stub_cuda_extension() -> None:
    """Make DINO importable and runnable on a CPU-only machine (at run time, /work/dino_src stays untouched)."""
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
    original_cuda, original_to = torch.Tensor.cuda, torch.Tensor.to

    def cpu_cuda(self, *args, **kwargs):
        return self

    def cpu_to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.cuda = cpu_cuda
    torch.Tensor.to = cpu_to
    return original_cuda, original_to


def import_dino(dino_path: str):
    """Import DINO's modules from ``dino_path`` and route its deformable attention to the pure-PyTorch core."""
    sys.path.insert(0, dino_path)
    stub_cuda_extension()
    from models.dino import deformable_transformer, dino  # noqa: F401  (registers build_dino)
    from models.dino.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch
    from models.dino.ops.modules import ms_deform_attn

    class PytorchMSDeformAttnFunction:
        @staticmethod
        def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
            return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)

    ms_deform_attn.MSDeformAttnFunction = PytorchMSDeformAttnFunction
    deformable_transformer.gen_sineembed_for_position = sine_embedding_for_width(
        deformable_transformer.gen_sineembed_for_position, HIDDEN_DIM // 2)
    return dino


def sine_embedding_for_width(dino_sine, num_feats: int):
    """DINO's ``gen_sineembed_for_position`` hard-codes 128 features per coordinate (d_model 256). For a tiny
    ``d_model`` its natural generalization (frequencies ``10000 ** (2 * (i // 2) / num_feats)``) is a column subset
    of DINO's own 128-feature output: feature ``2m`` / ``2m + 1`` of ``num_feats`` is feature ``2mr`` / ``2mr + 1``
    of 128 with ``r = 128 / num_feats``. So this calls DINO's unchanged function and keeps those columns; the test
    also checks our embedding against DINO's full 128-feature output (stored in the fixture)."""
    ratio = 128 // num_feats
    assert ratio * num_feats == 128, num_feats
    pairs = torch.arange(num_feats // 2) * 2 * ratio
    within = torch.stack((pairs, pairs + 1), -1).flatten()  # (num_feats,)

    def embed(pos_tensor):
        full = dino_sine(pos_tensor)
        blocks = full.shape[-1] // 128
        index = torch.cat([within + 128 * block for block in range(blocks)]).to(full.device)
        return full[..., index]

    return embed


def dino_args(dino_path: str) -> argparse.Namespace:
    """DINO's 4-scale config (config/DINO/DINO_4scale.py), shrunk to a tiny model."""
    values = {}
    for name in ("coco_transformer.py", "DINO_4scale.py"):
        exec(compile(Path(dino_path, "config", "DINO", name).read_text(), name, "exec"), {}, values)
    values.pop("_base_", None)
    values.update(
        hidden_dim=HIDDEN_DIM, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=128, num_queries=30,
        num_select=300, dn_number=DN_NUMBER, dn_box_noise_scale=0.0, dn_label_noise_ratio=0.0, device="cpu",
        num_classes=91, dn_labelbook_size=91,
    )
    return argparse.Namespace(**values)


class InjectedBackbone(nn.Sequential):
    """Stands in for DINO's ``Joiner(backbone, position_embedding)``: returns fixed maps instead of a ResNet's.

    ``self[1]`` is DINO's own position embedding (DINO calls it for the extra levels); masks are made exactly like
    DINO's ``BackboneBase``: nearest interpolation of the image padding mask.
    """

    def __init__(self, features: list, position_embedding: nn.Module):
        super().__init__(nn.Identity(), position_embedding)
        self.features = features
        self.num_channels = [f.shape[1] for f in features]

    def forward(self, samples):
        from util.misc import NestedTensor

        out, pos = [], []
        for feature in self.features:
            mask = F.interpolate(samples.mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
            nested = NestedTensor(feature.clone(), mask)
            out.append(nested)
            pos.append(self[1](nested).to(feature.dtype))
        return out, pos


def make_inputs(generator: torch.Generator) -> dict:
    """Canvas ``pixel_values (2, 3, 96, 128)``, ``pixel_mask (2, 96, 128)`` (1 = real), backbone maps, targets."""
    batch = len(VALID_SIZES)
    pixel_mask = torch.zeros(batch, *IMAGE_SIZE, dtype=torch.long)
    for index, (h, w) in enumerate(VALID_SIZES):
        pixel_mask[index, :h, :w] = 1
    features = [  # float16-representable, stored as float16
        torch.randn(batch, channels, IMAGE_SIZE[0] // stride, IMAGE_SIZE[1] // stride, generator=generator).half().float()
        for channels, stride in zip(BACKBONE_CHANNELS, (8, 16, 32))
    ]
    return {
        "pixel_values": torch.zeros(batch, 3, *IMAGE_SIZE),
        "pixel_mask": pixel_mask,
        "features": features,
        "targets_equal": random_targets([3, 3], generator),
        "targets_padded": random_targets([3, 1], generator),
        "target_sizes": torch.tensor(VALID_SIZES),
    }


def random_targets(counts: list, generator: torch.Generator) -> list:
    """``[{"labels": (n,), "boxes": (n, 4) cxcywh in the unpadded image}]`` with COCO ids in [1, 90]."""
    targets = []
    for n in counts:
        centres = torch.rand(n, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.1
        labels = torch.randint(1, 91, (n,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat((centres, sizes), -1)})
    return targets


def perturb_(model: nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """DINO's own init plus noise on every parameter, so zero-initialized layers (box-head output, attention
    weights) take part and the decoder refines boxes visibly. Every parameter and buffer is then rounded to a
    float16-representable float32 value, so the fixture stores them as float16 without changing them."""
    with torch.no_grad():
        for parameter in model.parameters():  # shared heads are yielded once
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def layer_outputs(out: dict) -> tuple:
    """DINO output dict -> per-layer logits ``(L, B, Q, C)`` and boxes ``(L, B, Q, 4)`` of the matching queries."""
    layers = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    return torch.stack([o["pred_logits"] for o in layers]), torch.stack([o["pred_boxes"] for o in layers])


def record(out: dict) -> dict:
    logits, boxes = layer_outputs(out)
    record = {
        "decoder_logits": logits.detach(), "decoder_boxes": boxes.detach(),
        "enc_logits": out["interm_outputs"]["pred_logits"].detach(),
        "enc_boxes": out["interm_outputs"]["pred_boxes"].detach(),
    }
    dn_meta = out.get("dn_meta")
    if dn_meta and "output_known_lbs_bboxes" in dn_meta:
        dn_logits, dn_boxes = layer_outputs(dn_meta["output_known_lbs_bboxes"])
        record.update(dn_logits=dn_logits.detach(), dn_boxes=dn_boxes.detach(), dn_num_groups=dn_meta["num_dn_group"],
                      dn_pad_size=dn_meta["pad_size"])
    return record


def run_train(model, criterion, samples, targets) -> dict:
    model.train()
    criterion.train()
    out = model(samples, targets)
    losses = criterion(out, targets)
    weighted = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    rec = record(out)
    rec["losses"] = {k: v.detach().clone() for k, v in losses.items()}
    rec["weighted_loss"] = weighted.detach()
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dino_path", default="/work/dino_src")
    parser.add_argument("--output", default="tests/fixtures/dino_parity.pt")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(cli.seed)
    generator = torch.Generator().manual_seed(cli.seed)

    dino = import_dino(cli.dino_path)
    from models.dino.position_encoding import build_position_encoding
    from util.misc import NestedTensor

    args = dino_args(cli.dino_path)
    inputs = make_inputs(generator)
    backbone = InjectedBackbone(inputs["features"], build_position_encoding(args))
    dino.build_backbone = lambda _args: backbone
    model, criterion, postprocessors = dino.build_dino(args)
    from models.dino.utils import gen_sineembed_for_position
    sine_points = torch.rand(1, 6, 4, generator=generator)
    sine_reference = gen_sineembed_for_position(sine_points)  # DINO's original (1, 6, 512)
    perturb_(model, generator)
    samples = NestedTensor(inputs["pixel_values"], ~inputs["pixel_mask"].bool())

    model.eval()
    with torch.no_grad():
        out = model(samples)
    evaluated = record(out)
    detections = postprocessors["bbox"](out, inputs["target_sizes"])
    evaluated["detections"] = [{k: v.detach() for k, v in d.items()} for d in detections]

    train = {name: run_train(model, criterion, samples, inputs[name]) for name in ("targets_equal", "targets_padded")}

    shared = {}  # DINO's shared heads appear under several keys: store each tensor once
    state_dict = {
        k: shared.setdefault((v.data_ptr(), tuple(v.shape)), half_of(v))
        for k, v in model.state_dict().items() if not k.startswith("backbone.")
    }
    stored_inputs = {  # pixel_values are zeros (the backbone is bypassed): the test rebuilds them
        "pixel_mask": inputs["pixel_mask"].bool(), "features": [half_of(f) for f in inputs["features"]],
        "targets_equal": inputs["targets_equal"], "targets_padded": inputs["targets_padded"],
        "target_sizes": inputs["target_sizes"],
    }
    meta = check_fixture(evaluated, train)
    fixture = {
        "state_dict": state_dict,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
        "inputs": stored_inputs,
        "eval": evaluated,
        "train": train,
        "meta": meta,
        "sine_embedding": {"points": sine_points, "dino": sine_reference},
    }
    Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, cli.output)
    size = Path(cli.output).stat().st_size
    print(f"saved {cli.output}: {size / 2**20:.2f} MiB, {len(state_dict)} DINO keys; meta {meta}")
    if size > 2 * 2**20:
        raise SystemExit(f"fixture is {size} bytes (> 2 MiB)")


def half_of(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor whose values are float16-representable -> float16 (lossless; checked)."""
    if not tensor.is_floating_point():
        return tensor.detach().clone()
    half = tensor.detach().half()
    assert torch.equal(half.float(), tensor.detach().float()), "value not float16-representable"
    return half


def check_fixture(evaluated: dict, train: dict) -> dict:
    """Conditions under which DINO and our model must agree exactly, checked on DINO's side and recorded.

    * every box stays in (1e-3, 1 - 1e-3): DINO's ``inverse_sigmoid`` clamps at 1e-3, ours at 1e-5;
    * no selected encoder proposal is an invalid one (DINO's top-k does not mask them, ours does).
    """
    boxes = [evaluated["decoder_boxes"], evaluated["enc_boxes"]] + [t["decoder_boxes"] for t in train.values()]
    margin = min(float(torch.minimum(b, 1 - b).min()) for b in boxes)
    if margin <= 1e-3:
        raise SystemExit(f"a box comes within {margin} of 0/1: inverse_sigmoid eps (1e-3 vs 1e-5) would matter")
    return {"box_margin": margin, "dn_number": DN_NUMBER, "backbone": "test_resnet",
            "backbone_channels": BACKBONE_CHANNELS}


if __name__ == "__main__":
    main()
