"""Convert an original IDEA-Research DINO checkpoint (4-scale, deformable, two-stage) to Sparse Semi-DETR.

    python -m sparse_semi_detr_hf.convert_dino_to_hf --checkpoint_path checkpoint0011_4scale.pth \
        --pytorch_dump_folder_path dino-4scale-hf [--push_to_hub --hub_model_id user/dino-4scale]

The result is a ``SparseSemiDetrForObjectDetection`` with ``query_mode="none"`` (plain DINO) and an image processor,
so ``pipeline("object-detection", model=folder)`` works. The 91 COCO class ids of DINO's head are kept (id 0 and the
ten unused COCO ids are labelled ``"N/A"``).

Mapping notes (tests/test_dino_parity.py checks them against DINO's own outputs):

* decoder self-attention ``in_proj_weight (3D, D)`` is split into ``q_proj`` / ``k_proj`` / ``v_proj``; DINO's decoder
  norms are ``norm2`` (after self-attention), ``norm1`` (after cross-attention), ``norm3`` (after the FFN);
* DINO shares one class head and one box head between all decoder layers (``class_embed.{i}``,
  ``transformer.decoder.class_embed.{i}``...); all copies must be equal (``dec_pred_*_embed_share=True``);
* ``label_enc`` row ``num_classes`` is replaced by zeros: DINO pads the denoising groups of images with fewer targets
  with all-zero content queries, we with the label-embedding row ``num_labels``; DINO never reads that row (noisy
  labels are drawn in ``[0, num_classes)``), so zeroing it reproduces DINO's padding exactly. Extra rows of a larger
  ``dn_labelbook_size`` are dropped for the same reason;
* the torchvision ResNet ``backbone.0.body.*`` maps one to one onto timm's ``features_only`` ResNet
  (``model.backbone.body.*``); FrozenBatchNorm has the same buffers.

Only torch, torchvision, transformers and relative imports are used (the model side of this package).
"""

import argparse
import logging
import re
from collections import OrderedDict

import torch
from torch import Tensor

from .configuration_sparse_semi_detr import SparseSemiDetrConfig

logger = logging.getLogger(__name__)

# COCO category ids -> names (the 80 used ids of instances_*.json); other ids of DINO's 91-way head are "N/A".
COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck", 9: "boat",
    10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
    18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

# Backbone output channels (strides 8/16/32) of the timm trunks a DINO checkpoint can come with.
KNOWN_BACKBONE_CHANNELS = {
    "resnet50": [512, 1024, 2048], "resnet101": [512, 1024, 2048], "resnet152": [512, 1024, 2048],
    "resnet18": [128, 256, 512], "resnet34": [128, 256, 512], "test_resnet": [48, 192, 96],
}

# (DINO key pattern, our key template); applied in order, the first match wins.
_RENAMES = [
    (r"transformer\.level_embed", "model.level_embed"),
    (r"input_proj\.(\d+)\.(\d+)\.(weight|bias)", r"model.neck.layers.\1.\2.\3"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)",
     r"model.encoder.layers.\1.self_attn.\2.\3"),
    (r"transformer\.encoder\.layers\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"model.encoder.layers.\1.\2.\3"),
    (r"transformer\.encoder\.layers\.(\d+)\.(linear1|linear2)\.(weight|bias)", r"model.encoder.layers.\1.ffn.\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.(\w+)\.(weight|bias)",
     r"model.decoder.layers.\1.cross_attn.\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     r"model.decoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"model.decoder.layers.\1.norm_cross.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"model.decoder.layers.\1.norm_self.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)", r"model.decoder.layers.\1.norm_ffn.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.(linear1|linear2)\.(weight|bias)", r"model.decoder.layers.\1.ffn.\2.\3"),
    (r"transformer\.decoder\.norm\.(weight|bias)", r"model.decoder.norm.\1"),
    (r"transformer\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)",
     r"model.decoder.query_pos_head.layers.\1.\2"),
    (r"(?:transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)", r"model.class_head.\1"),
    (r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.layers\.(\d+)\.(weight|bias)", r"model.box_head.layers.\1.\2"),
    (r"transformer\.tgt_embed\.weight", "model.query_selection.content_queries.weight"),
    (r"transformer\.enc_output\.(weight|bias)", r"model.query_selection.output_proj.\1"),
    (r"transformer\.enc_output_norm\.(weight|bias)", r"model.query_selection.output_norm.\1"),
    (r"transformer\.enc_out_class_embed\.(weight|bias)", r"model.query_selection.class_head.\1"),
    (r"transformer\.enc_out_bbox_embed\.layers\.(\d+)\.(weight|bias)", r"model.query_selection.box_head.layers.\1.\2"),
    (r"label_enc\.weight", "model.label_embedding.weight"),
    (r"backbone\.0\.body\.(.+)", r"model.backbone.body.\1"),
]
_IN_PROJ = re.compile(r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)")
_IGNORED = re.compile(r".*num_batches_tracked$")


def _rename(key: str) -> str | None:
    for pattern, template in _RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def _strip_prefix(state_dict: dict) -> dict:
    """DDP / EMA checkpoints prefix every key with ``module.``."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def convert_dino_state_dict(original_state_dict: dict) -> "OrderedDict[str, Tensor]":
    """DINO ``ckpt["model"]`` -> ``SparseSemiDetrForObjectDetection`` state dict (same values, our key names).

    Raises ``KeyError`` on a DINO key this mapping does not know (another DINO variant: not silently dropped) and
    ``ValueError`` when copies of a shared head differ or a tensor has an impossible shape. Missing keys and shapes
    against a concrete model are checked by :func:`check_converted_state_dict`.
    """
    converted: "OrderedDict[str, Tensor]" = OrderedDict()
    unknown = []
    for key, value in _strip_prefix(dict(original_state_dict)).items():
        if _IGNORED.fullmatch(key):
            continue
        in_proj = _IN_PROJ.fullmatch(key)
        if in_proj:
            layer, kind = in_proj.groups()
            if value.shape[0] % 3:
                raise ValueError(f"{key}: shape {tuple(value.shape)} is not 3 stacked projections (q, k, v)")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"model.decoder.layers.{layer}.self_attn.{name}.{kind}"] = part.clone()
            continue
        new_key = _rename(key)
        if new_key is None:
            unknown.append(key)
            continue
        if new_key in converted:  # a copy of a shared head
            if converted[new_key].shape != value.shape or not torch.equal(converted[new_key], value):
                raise ValueError(
                    f"{key} differs from another copy of {new_key}: per-layer (unshared) decoder heads "
                    "(dec_pred_class_embed_share / dec_pred_bbox_embed_share = False) are not supported.")
            continue
        converted[new_key] = value.clone()
    if unknown:
        raise KeyError(f"{len(unknown)} DINO keys have no counterpart (unsupported DINO variant?): {unknown[:10]}")
    if "model.label_embedding.weight" in converted and "model.class_head.weight" in converted:
        num_labels = converted["model.class_head.weight"].shape[0]
        label_embedding = converted["model.label_embedding.weight"]
        if label_embedding.shape[0] < num_labels:
            raise ValueError(f"label_enc has {label_embedding.shape[0]} rows for {num_labels} classes")
        padding = label_embedding.new_zeros(1, label_embedding.shape[1])  # DINO's padding content (see module doc)
        converted["model.label_embedding.weight"] = torch.cat((label_embedding[:num_labels], padding))
    return converted


def check_converted_state_dict(converted: dict, model: torch.nn.Module, allow_missing_backbone: bool = False) -> list:
    """Compare with ``model.state_dict()``; raise ``KeyError`` / ``ValueError`` on missing, unexpected or misshapen
    keys. Returns the missing backbone keys (allowed only with ``allow_missing_backbone``)."""
    expected = model.state_dict()
    unexpected = sorted(set(converted) - set(expected))
    missing = sorted(set(expected) - set(converted))
    missing_backbone = [key for key in missing if key.startswith("model.backbone.")]
    missing_other = [key for key in missing if not key.startswith("model.backbone.")]
    if unexpected:
        raise KeyError(f"{len(unexpected)} converted keys are not in the model: {unexpected[:10]}")
    if missing_other:
        raise KeyError(f"{len(missing_other)} model keys are missing from the checkpoint: {missing_other[:10]}")
    if missing_backbone and not allow_missing_backbone:
        raise KeyError(
            f"the checkpoint has no weights for {len(missing_backbone)} backbone keys (e.g. {missing_backbone[:3]}); "
            "pass allow_missing_backbone / --allow_missing_backbone to keep a randomly initialized backbone.")
    wrong = [(key, tuple(value.shape), tuple(expected[key].shape)) for key, value in converted.items()
             if tuple(value.shape) != tuple(expected[key].shape)]
    if wrong:
        raise ValueError(f"{len(wrong)} shape mismatches (key, checkpoint, model): {wrong[:10]}")
    return missing_backbone


def _args_dict(args) -> dict:
    if args is None:
        return {}
    return dict(vars(args)) if not isinstance(args, dict) else dict(args)


def _count_layers(state_dict: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict for m in [pattern.match(key)] if m}
    return max(indices) + 1 if indices else 0


def _reject_unsupported(args: dict) -> None:
    checks = {
        "two_stage_type": "standard", "decoder_sa_type": "sa", "num_patterns": 0, "two_stage_add_query_num": 0,
        "two_stage_pat_embed": 0, "two_stage_learn_wh": False, "two_stage_keep_all_tokens": False,
        "dec_layer_number": None, "use_detached_boxes_dec_out": False, "pre_norm": False, "masks": False,
        "embed_init_tgt": True, "dec_pred_class_embed_share": True, "dec_pred_bbox_embed_share": True,
    }
    bad = {k: args[k] for k, supported in checks.items() if k in args and args[k] != supported}
    if bad:
        raise ValueError(f"unsupported DINO settings (this converter handles DINO 4/5-scale defaults): {bad}")
    if args.get("pe_temperatureH", 20) != args.get("pe_temperatureW", 20):
        raise ValueError("pe_temperatureH != pe_temperatureW is not supported")


def _backbone_name(channels: list, args: dict, override: str | None) -> str:
    """timm name of the checkpoint's trunk; DINO's torchvision ResNets are timm's ``*.tv_in1k`` (same weights)."""
    if override:
        return override
    named = args.get("backbone")
    if named in KNOWN_BACKBONE_CHANNELS and KNOWN_BACKBONE_CHANNELS[named] == channels:
        return _torchvision_tag(named)
    matches = [name for name, known in KNOWN_BACKBONE_CHANNELS.items() if known == channels]
    if not matches:
        raise ValueError(f"no known timm backbone has output channels {channels}; pass backbone=...")
    if named:
        logger.warning("DINO args name backbone %r but input_proj expects channels %s: using %r", named, channels,
                       matches[0])
    return _torchvision_tag(matches[0])


def _torchvision_tag(name: str) -> str:
    return f"{name}.tv_in1k" if name.startswith("resnet") else name


def build_config_from_dino(state_dict: dict, args=None, backbone: str | None = None,
                           **overrides) -> SparseSemiDetrConfig:
    """A ``SparseSemiDetrConfig`` (``query_mode="none"``) for a DINO checkpoint.

    Shapes give d_model, levels, layers, queries, classes, FFN widths and backbone channels; ``args`` (the
    checkpoint's ``ckpt["args"]``, a Namespace or dict, optional) give heads / points, the denoising settings, loss
    and matcher coefficients and ``num_select``. Without ``args`` DINO's defaults (8 heads) are assumed and the
    points per head / level follow from the shapes. ``overrides`` are passed to the config last.
    """
    state_dict = _strip_prefix(dict(state_dict))
    args = _args_dict(args)
    _reject_unsupported(args)
    for required in ("transformer.level_embed", "transformer.tgt_embed.weight", "transformer.enc_out_class_embed.weight"):
        if required not in state_dict:
            raise KeyError(f"{required} not in the checkpoint: not a two-stage DINO with embed_init_tgt")
    levels, d_model = state_dict["transformer.level_embed"].shape
    encoder_layers = _count_layers(state_dict, "transformer.encoder.layers")
    decoder_layers = _count_layers(state_dict, "transformer.decoder.layers")
    num_backbone_levels = sum(
        1 for i in range(levels) if state_dict.get(f"input_proj.{i}.0.weight", torch.empty(0, 0, 3)).shape[-1] == 1)
    channels = [int(state_dict[f"input_proj.{i}.0.weight"].shape[1]) for i in range(num_backbone_levels)]
    heads = int(args.get("nheads", 8))
    per_head_enc = state_dict["transformer.encoder.layers.0.self_attn.attention_weights.weight"].shape[0]
    per_head_dec = state_dict["transformer.decoder.layers.0.cross_attn.attention_weights.weight"].shape[0]
    enc_points = int(args.get("enc_n_points", per_head_enc // (heads * levels)))
    dec_points = int(args.get("dec_n_points", per_head_dec // (heads * levels)))
    if heads * levels * enc_points != per_head_enc or heads * levels * dec_points != per_head_dec:
        raise ValueError(f"attention shapes ({per_head_enc}, {per_head_dec}) do not fit {heads} heads x {levels} "
                         f"levels x ({enc_points}, {dec_points}) points")
    num_labels = int(state_dict["transformer.enc_out_class_embed.weight"].shape[0])
    interm = args.get("return_interm_indices", list(range(4 - num_backbone_levels, 4)))
    dn_number = int(args.get("dn_number", 100)) if args.get("use_dn", True) else 0
    if 0 < 2 * dn_number < 100:
        logger.warning("dn_number=%d: DINO then uses 2*dn_number groups whatever the target count, this model "
                       "num_denoising_queries // max_targets groups", dn_number)
    kwargs = dict(
        backbone=_backbone_name(channels, args, backbone),
        backbone_out_indices=[int(i) + 1 for i in interm],  # torchvision layer{i+1} = timm feature index i + 1
        freeze_backbone_batch_norm=True,
        d_model=int(d_model), num_feature_levels=int(levels),
        position_embedding_temperature=float(args.get("pe_temperatureH", 20)),
        encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_n_points=enc_points, decoder_n_points=dec_points,
        encoder_ffn_dim=int(state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        decoder_ffn_dim=int(state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0]),
        dropout=float(args.get("dropout", 0.0)), activation_function=args.get("transformer_activation", "relu"),
        num_queries=int(state_dict["transformer.tgt_embed.weight"].shape[0]),
        look_forward_twice=True, decoder_reference_from_normed=False,
        num_denoising_queries=dn_number,
        label_noise_ratio=float(args.get("dn_label_noise_ratio", 0.5)),
        box_noise_scale=float(args.get("dn_box_noise_scale", 0.4)),
        class_loss_coefficient=float(args.get("cls_loss_coef", 1.0)),
        bbox_loss_coefficient=float(args.get("bbox_loss_coef", 5.0)),
        giou_loss_coefficient=float(args.get("giou_loss_coef", 2.0)),
        focal_alpha=float(args.get("focal_alpha", 0.25)),
        matcher_class_cost=float(args.get("set_cost_class", 2.0)),
        matcher_bbox_cost=float(args.get("set_cost_bbox", 5.0)),
        matcher_giou_cost=float(args.get("set_cost_giou", 2.0)),
        num_detections=int(args.get("num_select", 300)),
        query_mode="none",
        id2label={i: COCO_NAMES.get(i, "N/A") for i in range(num_labels)} if num_labels == 91 else
        {i: f"LABEL_{i}" for i in range(num_labels)},
    )
    kwargs["inverse_sigmoid_eps"] = 1e-3  # DINO's util.misc.inverse_sigmoid
    kwargs["backbone_frozen_stages"] = 1  # DINO's BackboneBase trains layer2-4 only (stem + layer1 frozen)
    if "neck_group_norm_groups" not in overrides:
        kwargs["neck_group_norm_groups"] = 32
    kwargs.update(overrides)
    return SparseSemiDetrConfig(**kwargs)


# Converted keys whose first dimension indexes the classes (label embedding: classes + its padding row).
CLASS_ROW_KEYS = ("model.class_head.weight", "model.class_head.bias", "model.query_selection.class_head.weight",
                  "model.query_selection.class_head.bias")
COCO80_IDS = sorted(COCO_NAMES)


def slice_to_coco80(converted: dict, config: SparseSemiDetrConfig) -> tuple[dict, SparseSemiDetrConfig]:
    """The 91-id COCO head of a converted DINO reduced to COCO's 80 categories, in sorted-id order.

    Labels ``0..79`` are then the COCO category ids in ascending order: the contiguous labels this package's COCO
    loader gives (``training/data.py``), so the model fine-tunes or evaluates on a COCO-format dataset without a new
    head. The class heads keep rows ``COCO80_IDS``; the denoising label embedding keeps rows ``COCO80_IDS + [91]``
    (the last one: the padding row). What this approximates: the 11 unused ids are dropped from the encoder's
    proposal scores (the max over classes that picks the top-K queries), which only changes the selection where an
    unused id scored highest; DINO trained them as background everywhere, so that is rare.
    """
    if config.num_labels != 91:
        raise ValueError(f"coco80 slicing needs DINO's 91-id head, the checkpoint has {config.num_labels} classes.")
    rows = torch.tensor(COCO80_IDS)
    sliced = OrderedDict(converted)
    for key in CLASS_ROW_KEYS:
        sliced[key] = converted[key][rows].clone()
    sliced["model.label_embedding.weight"] = converted["model.label_embedding.weight"][
        torch.cat((rows, torch.tensor([config.num_labels])))].clone()
    config_dict = config.to_dict()
    for key in ("id2label", "label2id", "num_labels", "model_type", "transformers_version", "architectures"):
        config_dict.pop(key, None)
    id2label = {index: COCO_NAMES[category] for index, category in enumerate(COCO80_IDS)}
    return sliced, SparseSemiDetrConfig(**config_dict, id2label=id2label,
                                        label2id={name: index for index, name in id2label.items()})


def load_dino_checkpoint(path: str) -> tuple[dict, dict]:
    """``(ckpt["model"], ckpt["args"] as a dict or {})`` of a DINO ``.pth`` (or a bare state dict)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # DINO stores its argparse.Namespace next to the weights
        logger.warning("%s holds non-tensor objects (DINO's args): loading it with weights_only=False; only convert "
                       "checkpoints you trust", path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        return checkpoint["model"], _args_dict(checkpoint.get("args"))
    return checkpoint, {}


def convert_dino_checkpoint(checkpoint_path: str, pytorch_dump_folder_path: str, allow_missing_backbone: bool = False,
                            backbone: str | None = None, push_to_hub: bool = False, hub_model_id: str | None = None,
                            coco80: bool = False):
    """Load, convert, check and save model + image processor (``coco80``: see :func:`slice_to_coco80`); returns
    the model."""
    from .image_processing_sparse_semi_detr import SparseSemiDetrImageProcessor
    from .modeling_sparse_semi_detr import SparseSemiDetrForObjectDetection

    original, args = load_dino_checkpoint(checkpoint_path)
    config = build_config_from_dino(original, args, backbone=backbone)
    converted = convert_dino_state_dict(original)
    model = SparseSemiDetrForObjectDetection(config).eval()
    missing_backbone = check_converted_state_dict(converted, model, allow_missing_backbone)
    if missing_backbone:
        banner = "!" * 100
        logger.warning("%s\nTHE CHECKPOINT HAS NO BACKBONE WEIGHTS: %d %s backbone tensors keep their RANDOM "
                       "initialization. Detections of the saved model are meaningless until a backbone is loaded."
                       "\n%s", banner, len(missing_backbone), config.backbone, banner)
        print(f"WARNING: no backbone weights in {checkpoint_path}; the backbone of the saved model is random.")
    if coco80:
        converted, config = slice_to_coco80(converted, config)
        model = SparseSemiDetrForObjectDetection(config).eval()
    model.load_state_dict(converted, strict=False)
    processor = SparseSemiDetrImageProcessor()
    model.save_pretrained(pytorch_dump_folder_path)
    processor.save_pretrained(pytorch_dump_folder_path)
    if push_to_hub:
        if not hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        model.push_to_hub(hub_model_id)
        processor.push_to_hub(hub_model_id)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an IDEA-Research DINO checkpoint to Sparse Semi-DETR.")
    parser.add_argument("--checkpoint_path", required=True, help="DINO .pth (ckpt['model'] [+ ckpt['args']]).")
    parser.add_argument("--pytorch_dump_folder_path", required=True, help="Output folder (model + image processor).")
    parser.add_argument("--allow_missing_backbone", action="store_true",
                        help="Accept a checkpoint without backbone weights (the backbone stays random; loud warning).")
    parser.add_argument("--backbone", default=None, help="timm backbone name (default: inferred from the checkpoint).")
    parser.add_argument("--coco80", action="store_true",
                        help="Keep COCO's 80 categories (labels 0..79 = sorted COCO ids, as this package's COCO loader "
                             "numbers them) instead of DINO's 91 ids; needed to fine-tune or evaluate on COCO here.")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None)
    cli = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    convert_dino_checkpoint(cli.checkpoint_path, cli.pytorch_dump_folder_path, cli.allow_missing_backbone,
                            cli.backbone, cli.push_to_hub, cli.hub_model_id, cli.coco80)
    print(f"saved to {cli.pytorch_dump_folder_path}")


if __name__ == "__main__":
    main()
