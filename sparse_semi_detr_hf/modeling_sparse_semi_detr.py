"""Sparse Semi-DETR: a DINO detector (4-scale deformable encoder, two-stage mixed query selection, contrastive
denoising, look-forward-twice box refinement) with the query modules of Sparse Semi-DETR, as a transformers model.

``SparseSemiDetrModel`` exposes ``encode`` and ``decode`` separately, so the semi-supervised trainer can compute
the teacher's features once per step and decode several query sets on them (docs/architecture.md).
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbone import Neck, TimmBackbone, downsample_padding_mask
from .configuration_sparse_semi_detr import SparseSemiDetrConfig
from .deformable_attention import SamplingOffsets, ZeroInitLinear, init_sampling_offsets_
from .denoising import DenoisingMeta, build_denoising_queries
from .loss import SetCriterion
from .position_encoding import SinePositionEmbedding
from .query_groups import QueryGroup, build_decoder_attention_mask
from .query_refinement import CrossViewProjector, QueryRefinementModule
from .query_selection import ContentQueries, QuerySelection
from .transformer import FOCAL_PRIOR_PROBABILITY, MLP, ClassHead, Decoder, Encoder


@dataclass
class EncoderState:
    """Everything the decoder (and the query modules) need from one view of a batch.

    Attributes:
        features: neck maps ``[(B, D, H_l, W_l)]`` at ``strides``; padding_masks: ``[(B, H_l, W_l)]`` True = padding.
        memory: ``(B, S, D)`` encoder output; memory_padding_mask: ``(B, S)``.
        spatial_shapes: ``(L, 2)`` long; shapes_list: the same as Python ints; level_start_index: ``(L,)``.
        valid_ratios: ``(B, L, 2)`` (w, h) share of each map that is not padding.
        enc_logits / enc_boxes: ``(B, K, C)`` / ``(B, K, 4)`` selected encoder proposals (loss inputs).
        anchors / content: ``(B, K, 4)`` detached initial boxes and ``(B, K, D)`` content queries.
    """

    features: list[Tensor]
    padding_masks: list[Tensor]
    strides: list[int]
    memory: Tensor
    memory_padding_mask: Tensor
    spatial_shapes: Tensor
    shapes_list: list[tuple[int, int]]
    level_start_index: Tensor
    valid_ratios: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
    anchors: Tensor
    content: Tensor


@dataclass
class GroupOutput:
    """Decoder outputs of one extra query group: ``(num_layers, B, n, D | C | 4)``."""

    hidden_states: Tensor
    logits: Tensor
    boxes: Tensor


@dataclass
class DecoderState:
    """Decoder outputs split by group; per-layer tensors are ``(num_layers, B, N_group, ...)``."""

    hidden_states: Tensor
    logits: Tensor
    boxes: Tensor
    dn_logits: Tensor | None = None
    dn_boxes: Tensor | None = None
    dn_meta: DenoisingMeta | None = None
    groups: list[GroupOutput] = field(default_factory=list)


@dataclass
class SparseSemiDetrModelOutput(ModelOutput):
    """Outputs of ``SparseSemiDetrModel.forward``.

    Args:
        Every tensor is batch-first (``B`` leading, as transformers' pipelines and ``Trainer`` slice outputs).

        last_hidden_state: ``(B, K, D)`` final decoder states of the matching queries.
        intermediate_hidden_states: ``(B, num_layers, K, D)``.
        intermediate_logits / intermediate_boxes: ``(B, num_layers, K, C)`` / ``(B, num_layers, K, 4)`` cxcywh.
        encoder_last_hidden_state: ``(B, S, D)``; encoder_hidden_states: with ``output_hidden_states``, the encoder's
            input and every layer's output, ``(B, S, D)`` each.
        enc_outputs_class / enc_outputs_coord: ``(B, K, C)`` / ``(B, K, 4)`` selected encoder proposals.
        init_reference_points: ``(B, K, 4)`` detached initial anchors.
        dn_logits / dn_boxes: ``(B, num_layers, Ndn, C | 4)`` denoising outputs.

    Attributes that are not output fields (internal state, not in ``to_tuple()``):
        denoising_meta: the ``DenoisingMeta`` layout of the denoising outputs (or None).
        extra_group_outputs: one ``GroupOutput`` per extra query group (or None).
        encoder_state: the ``EncoderState`` (reusable for another ``decode``).
    """

    last_hidden_state: Tensor | None = None
    intermediate_hidden_states: Tensor | None = None
    intermediate_logits: Tensor | None = None
    intermediate_boxes: Tensor | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple | None = None
    enc_outputs_class: Tensor | None = None
    enc_outputs_coord: Tensor | None = None
    init_reference_points: Tensor | None = None
    dn_logits: Tensor | None = None
    dn_boxes: Tensor | None = None
    # Internal state for the trainer, set as plain attributes (not output fields: left out of ``to_tuple()``,
    # ``keys()`` and what ``transformers.Trainer`` gathers, which must be tensors).
    denoising_meta = None
    extra_group_outputs = None
    encoder_state = None


@dataclass
class SparseSemiDetrObjectDetectionOutput(ModelOutput):
    """Outputs of ``SparseSemiDetrForObjectDetection.forward``.

    Args:
        loss: scalar, ``sum(criterion.weight_dict[k] * loss_dict[k])`` (only with ``labels``).
        loss_dict: every unweighted loss term once (keys in docs/architecture.md).
        logits: ``(B, K, C)`` final-layer class logits (sigmoid scores, no background class).
        pred_boxes: ``(B, K, 4)`` cxcywh normalized to the unpadded image.
        auxiliary_outputs: ``[{"logits", "pred_boxes"}]`` of the earlier decoder layers (only with ``labels``, as
            in transformers' DETR models; ``intermediate_logits`` / ``intermediate_boxes`` always hold every layer).
        intermediate_hidden_states: ``(B, num_layers, K, D)`` normed decoder states of the matching queries.
        decoder_hidden_states: with ``output_hidden_states``, the same per layer: a tuple of ``num_layers``
            ``(B, K, D)`` tensors.
        Other fields: as in ``SparseSemiDetrModelOutput`` (batch-first).
    """

    loss: Tensor | None = None
    loss_dict: dict | None = None
    logits: Tensor | None = None
    pred_boxes: Tensor | None = None
    auxiliary_outputs: list | None = None
    last_hidden_state: Tensor | None = None
    intermediate_hidden_states: Tensor | None = None
    decoder_hidden_states: tuple | None = None
    intermediate_logits: Tensor | None = None
    intermediate_boxes: Tensor | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple | None = None
    enc_outputs_class: Tensor | None = None
    enc_outputs_coord: Tensor | None = None
    init_reference_points: Tensor | None = None
    dn_logits: Tensor | None = None
    dn_boxes: Tensor | None = None
    # Internal state for the trainer, set as plain attributes (not output fields: left out of ``to_tuple()``,
    # ``keys()`` and what ``transformers.Trainer`` gathers, which must be tensors).
    denoising_meta = None
    extra_group_outputs = None
    encoder_state = None


class SparseSemiDetrPreTrainedModel(PreTrainedModel):
    config_class = SparseSemiDetrConfig
    supports_gradient_checkpointing = True
    config: SparseSemiDetrConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``; a model saved with its code (remote code) also maps ``AutoModel``
        to ``SparseSemiDetrModel``, so ``AutoModel.from_pretrained(..., trust_remote_code=True)`` loads the base
        model from a detection checkpoint."""
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", f"{__name__.rsplit('.', 1)[-1]}.SparseSemiDetrModel")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """DINO initialisation. The timm backbone keeps timm's own init (it is marked as initialized).

        transformers calls this only for modules that own parameters, and on loading only for those it
        re-initializes (a head re-made for a new label set, a module missing from the checkpoint). So every DINO
        rule is keyed on the type of the module that owns the parameters: ``ClassHead`` (focal prior),
        ``ZeroInitLinear`` (attention weights, box heads' last layer), ``SamplingOffsets``, ``ContentQueries``.
        """
        if isinstance(module, ClassHead):
            init.xavier_uniform_(module.weight)
            init.constant_(module.bias, -math.log((1 - FOCAL_PRIOR_PROBABILITY) / FOCAL_PRIOR_PROBABILITY))
        elif isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SamplingOffsets):
            init_sampling_offsets_(module)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ContentQueries):
            # DINO draws tgt_embed from N(0, 1) and then Xavier-initialises every 2-D transformer parameter, so
            # the content queries end Xavier-uniform (std ~0.04 at 900 x 256); the label embedding stays N(0, 1).
            init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:  # else uninitialized memory when the module is
                init.zeros_(module.running_mean)  # missing from a checkpoint (e.g. a supervised model loaded
                init.ones_(module.running_var)  # with query_mode cross_view)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, SparseSemiDetrModel):
            init.normal_(module.level_embed, mean=0.0, std=1.0)


def _build_query_module(config: SparseSemiDetrConfig) -> nn.Module | None:
    if config.query_mode == "refined":
        return QueryRefinementModule(config)
    if config.query_mode == "cross_view":
        return CrossViewProjector(config)
    return None


def _valid_ratios(padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, H, W)`` True = padding -> ``(B, 2)`` (w, h) valid share."""
    height, width = padding_mask.shape[-2:]
    valid_h = (~padding_mask[:, :, 0]).sum(1).to(dtype) / height
    valid_w = (~padding_mask[:, 0, :]).sum(1).to(dtype) / width
    return torch.stack((valid_w, valid_h), -1)


def _shapes_tensor(shapes_list: list[tuple[int, int]], device: torch.device) -> Tensor:
    """``[(H_l, W_l)]`` -> ``(L, 2)`` long on ``device``, filled on the device: ``torch.as_tensor(..., device=cuda)``
    would be a blocking host-to-device copy, i.e. a host sync in every ``encode``."""
    values = [torch.full((), size, dtype=torch.long, device=device) for shape in shapes_list for size in shape]
    return torch.stack(values).view(len(shapes_list), 2)


class SparseSemiDetrModel(SparseSemiDetrPreTrainedModel):
    """Backbone, neck, deformable encoder, query selection, decoder and the shared detection heads."""

    def __init__(self, config: SparseSemiDetrConfig):
        super().__init__(config)
        d = config.d_model
        self.backbone = TimmBackbone(config)
        self.neck = Neck(self.backbone.channels, config)
        extra = config.num_feature_levels - len(self.backbone.strides)
        self.strides = self.backbone.strides + [self.backbone.strides[-1] * 2 ** (i + 1) for i in range(extra)]
        self.position_embedding = SinePositionEmbedding(d // 2, config.position_embedding_temperature, normalize=True)
        self.level_embed = nn.Parameter(torch.zeros(config.num_feature_levels, d))
        self.encoder = Encoder(config)
        self.query_selection = QuerySelection(config)
        self.decoder = Decoder(config)
        self.class_head = ClassHead(d, config.num_labels)
        self.box_head = MLP(d, d, 4, 3, zero_last=True)
        self.label_embedding = nn.Embedding(config.num_labels + 1, d)
        self.query_module = _build_query_module(config)
        self.post_init()

    def load_pretrained_backbone(self) -> None:
        """Load timm's ImageNet weights into the backbone (network on first use; never called implicitly)."""
        self.backbone.load_pretrained_weights()

    def encode(self, pixel_values: Tensor, pixel_mask: Tensor | None = None,
               output_hidden_states: bool = False) -> EncoderState:
        """Backbone, neck, encoder and query selection for ``pixel_values (B, 3, H, W)``, ``pixel_mask (B, H, W)``.
        ``output_hidden_states``: keep the encoder's input and per-layer outputs (``state.hidden_states``)."""
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=pixel_values.device)
        padding_mask = ~pixel_mask.to(torch.bool)
        features = self.neck(self.backbone(pixel_values))
        masks = [downsample_padding_mask(padding_mask, feature.shape[-2:]) for feature in features]
        shapes_list = [tuple(feature.shape[-2:]) for feature in features]
        tokens = torch.cat([feature.flatten(2).transpose(1, 2) for feature in features], 1)  # (B, S, D)
        pos = torch.cat(
            [
                (self.position_embedding(mask, dtype=tokens.dtype).flatten(2).transpose(1, 2) + level_embed)
                for mask, level_embed in zip(masks, self.level_embed.to(tokens.dtype))
            ],
            1,
        )
        memory_padding_mask = torch.cat([mask.flatten(1) for mask in masks], 1)  # (B, S)
        spatial_shapes = _shapes_tensor(shapes_list, tokens.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([_valid_ratios(mask, tokens.dtype) for mask in masks], 1)  # (B, L, 2)
        hidden_states = [] if output_hidden_states else None
        memory = self.encoder(
            tokens, pos, spatial_shapes, level_start_index, valid_ratios, memory_padding_mask, shapes_list,
            hidden_states,
        )
        selected = self.query_selection(memory, memory_padding_mask, shapes_list)
        state = EncoderState(
            features, masks, self.strides, memory, memory_padding_mask, spatial_shapes, shapes_list,
            level_start_index, valid_ratios, selected.enc_logits, selected.enc_boxes, selected.anchors,
            selected.content,
        )
        state.hidden_states = tuple(hidden_states) if hidden_states is not None else None
        return state

    def decode(
        self,
        state: EncoderState,
        labels: list[dict] | None = None,
        extra_query_groups: list[QueryGroup] | None = None,
        generator: torch.Generator | None = None,
    ) -> DecoderState:
        """Decode ``[extra groups | denoising groups (from labels, if given) | matching queries]``."""
        groups = list(extra_query_groups or [])
        dn_content, dn_anchors, dn_meta = None, None, None
        if labels is not None:
            config = self.config
            dn_content, dn_anchors, dn_meta = build_denoising_queries(
                labels, self.label_embedding, config.num_labels, config.num_denoising_queries,
                config.label_noise_ratio, config.box_noise_scale, generator,
            )
        dtype = state.memory.dtype
        contents = [group.content.to(dtype) for group in groups] + ([dn_content.to(dtype)] if dn_meta else [])
        anchors = [group.anchors.detach().to(dtype) for group in groups] + ([dn_anchors.to(dtype)] if dn_meta else [])
        content = torch.cat(contents + [state.content.to(dtype)], 1)
        anchor = torch.cat(anchors + [state.anchors], 1)
        mask = build_decoder_attention_mask(
            groups, dn_meta.num_groups if dn_meta else 0, 2 * dn_meta.pad_size if dn_meta else 0,
            state.content.shape[1], content.device,
        )
        memory_state = (state.spatial_shapes, state.level_start_index, state.memory_padding_mask, state.shapes_list)
        hidden, boxes = self.decoder(
            content, anchor, state.memory, memory_state, state.valid_ratios, mask, self.box_head
        )
        logits = self.class_head(hidden)
        return _split_decoder_outputs(hidden, logits, boxes, groups, dn_meta)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None, labels=None, extra_query_groups=None,
                return_dict: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> SparseSemiDetrModelOutput | tuple:
        _refuse_attentions(self.config, output_attentions)
        state = self.encode(pixel_values, pixel_mask, _flag(self.config, "output_hidden_states", output_hidden_states))
        decoded = self.decode(state, labels if self.training else None, extra_query_groups)
        output = _model_output(SparseSemiDetrModelOutput, state, decoded)
        return output if _return_dict(self.config, return_dict) else output.to_tuple()


def _flag(config, name: str, value: bool | None) -> bool:
    """The call's value of a boolean output option, else the config's."""
    return bool(value) if value is not None else bool(getattr(config, name, False))


def _refuse_attentions(config, output_attentions: bool | None) -> None:
    if _flag(config, "output_attentions", output_attentions):
        raise NotImplementedError(
            "output_attentions is not supported: multi-scale deformable attention samples a few points per head "
            "and level, there is no attention matrix to return. output_hidden_states is supported.")


def _return_dict(config, return_dict: bool | None) -> bool:
    """The call's ``return_dict``, else the config's (``config.return_dict``, True by default)."""
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


def _split_decoder_outputs(hidden, logits, boxes, groups, dn_meta) -> DecoderState:
    """Split ``(num_layers, B, N, ...)`` decoder outputs into extra groups, denoising and matching queries."""
    sizes = [group.num_queries for group in groups] + ([dn_meta.num_queries] if dn_meta else [])
    sizes.append(hidden.shape[2] - sum(sizes))
    parts = [tensor.split(sizes, dim=2) for tensor in (hidden, logits, boxes)]
    group_outputs = [GroupOutput(parts[0][i], parts[1][i], parts[2][i]) for i in range(len(groups))]
    decoded = DecoderState(parts[0][-1], parts[1][-1], parts[2][-1], groups=group_outputs)
    if dn_meta is not None:
        decoded.dn_logits, decoded.dn_boxes, decoded.dn_meta = parts[1][-2], parts[2][-2], dn_meta
    return decoded


def _model_output(output_class, state: EncoderState, decoded: DecoderState, **extra):
    output = output_class(
        last_hidden_state=decoded.hidden_states[-1],
        intermediate_hidden_states=_batch_first(decoded.hidden_states),
        intermediate_logits=_batch_first(decoded.logits),
        intermediate_boxes=_batch_first(decoded.boxes),
        encoder_last_hidden_state=state.memory,
        encoder_hidden_states=getattr(state, "hidden_states", None),
        enc_outputs_class=state.enc_logits,
        enc_outputs_coord=state.enc_boxes,
        init_reference_points=state.anchors,
        dn_logits=_batch_first(decoded.dn_logits),
        dn_boxes=_batch_first(decoded.dn_boxes),
        **extra,
    )
    output.denoising_meta, output.extra_group_outputs = decoded.dn_meta, decoded.groups or None
    output.encoder_state = state
    return output


def _batch_first(layers: Tensor | None) -> Tensor | None:
    """``(num_layers, B, ...)`` -> a ``(B, num_layers, ...)`` view."""
    return None if layers is None else layers.transpose(0, 1)


class SparseSemiDetrForObjectDetection(SparseSemiDetrPreTrainedModel):
    """The detector with its loss. ``labels``: ``[{"class_labels": (n,), "boxes": (n, 4) cxcywh normalized}]``."""

    def __init__(self, config: SparseSemiDetrConfig):
        super().__init__(config)
        self.model = SparseSemiDetrModel(config)
        self.criterion = SetCriterion(config)
        self.post_init()

    def load_pretrained_backbone(self) -> None:
        self.model.load_pretrained_backbone()

    def forward(
        self,
        pixel_values: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        labels: list[dict] | None = None,
        extra_query_groups: list[QueryGroup] | None = None,
        encoder_state: EncoderState | None = None,
        assignment: str = "one_to_one",
        use_rpf: bool = False,
        denoising: bool | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> SparseSemiDetrObjectDetectionOutput | tuple:
        """
        Args:
            pixel_values: ``(B, 3, H, W)``; pixel_mask: ``(B, H, W)`` 1 = real pixel (optional).
            labels: targets; with them the loss is computed (and denoising queries added when ``denoising``). A
                target with ``size (h, w)`` (the image processor's labels) has its boxes normalized by that size
                (the padded canvas): see :func:`targets_in_model_frame`.
            extra_query_groups: extra decoder query groups (Semi-DETR / Sparse Semi-DETR queries).
            encoder_state: reuse a previous ``encode`` of the same images instead of ``pixel_values``.
            assignment: ``"one_to_one"`` (Hungarian) or ``"one_to_many"`` (stage 1 of hybrid matching).
            use_rpf: Reliable Pseudo-Label Filtering in the loss (targets must carry ``scores``).
            denoising: add denoising queries from ``labels``; default: in training mode.
            output_hidden_states: also return ``encoder_hidden_states`` (the encoder's input and every layer's
                output, ``(B, S, D)`` each) and ``decoder_hidden_states`` (every decoder layer's ``(B, K, D)``;
                ``intermediate_hidden_states`` always holds them stacked).
            output_attentions: not supported (deformable attention samples points, it has no attention matrix).
        """
        _refuse_attentions(self.config, output_attentions)
        with_hidden = _flag(self.config, "output_hidden_states", output_hidden_states)
        labels = targets_in_model_frame(labels, pixel_values, pixel_mask)
        state = encoder_state if encoder_state is not None else self.model.encode(pixel_values, pixel_mask,
                                                                                  with_hidden)
        if denoising is None:
            denoising = self.training
        decoded = self.model.decode(state, labels if denoising else None, extra_query_groups, generator)
        loss, loss_dict = None, None
        if labels is not None:
            loss_dict = self.criterion(
                decoded.logits, decoded.boxes, labels,
                enc_logits=state.enc_logits, enc_boxes=state.enc_boxes,
                dn_logits=decoded.dn_logits, dn_boxes=decoded.dn_boxes, dn_meta=decoded.dn_meta,
                assignment=assignment, use_rpf=use_rpf, generator=generator,
            )
            loss = self.criterion.weighted_sum(loss_dict)
            if decoded.dn_meta is None and self.training:
                # No denoising query this step (no target): keep the label embedding in the graph so every DDP
                # rank reduces the same parameters.
                loss = loss + 0.0 * self.model.label_embedding.weight.sum()
        auxiliary = None if labels is None else [
            {"logits": logits, "pred_boxes": boxes}
            for logits, boxes in zip(decoded.logits[:-1], decoded.boxes[:-1])
        ]
        output = _model_output(
            SparseSemiDetrObjectDetectionOutput, state, decoded, loss=loss, loss_dict=loss_dict,
            logits=decoded.logits[-1], pred_boxes=decoded.boxes[-1], auxiliary_outputs=auxiliary,
            decoder_hidden_states=tuple(decoded.hidden_states) if with_hidden else None,
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()


def targets_in_model_frame(labels: list[dict] | None, pixel_values: Tensor | None,
                           pixel_mask: Tensor | None) -> list[dict] | None:
    """Target boxes normalized by their ``size`` -> normalized by the image the model sees.

    The model predicts ``cxcywh`` boxes relative to each image's real pixels: the ``pixel_mask`` region (the whole
    ``pixel_values`` canvas without a mask). transformers' image processors normalize target boxes by the padded
    canvas and say so in ``size (h, w)``; a box normalized by ``size`` is rescaled by ``size / valid size`` per axis
    (padding is bottom/right, so no shift). Targets without ``size`` (the training loop's, pseudo-labels) are taken
    to be in the model's frame already and pass unchanged, as do all targets when only an ``encoder_state`` is given.
    No host sync.
    """
    if labels is None or pixel_values is None or not any("size" in target for target in labels):
        return labels
    if pixel_mask is None:
        valid = pixel_values.new_tensor(pixel_values.shape[-2:]).expand(len(labels), 2)
    else:
        valid = torch.stack((pixel_mask[:, :, 0].sum(1), pixel_mask[:, 0, :].sum(1)), -1)  # (B, 2) (h, w)
    converted = []
    for target, (valid_h, valid_w) in zip(labels, valid):
        if "size" not in target:
            converted.append(target)
            continue
        boxes = target["boxes"]
        size = torch.as_tensor(target["size"], device=boxes.device).to(boxes.dtype)
        scale = torch.stack((size[1] / valid_w.to(boxes), size[0] / valid_h.to(boxes))).repeat(2)
        converted.append({**target, "boxes": boxes * scale})
    return converted


def _declare_object_detection_support() -> None:
    """Name this model among transformers' object-detection models, so ``pipeline("object-detection")`` does not
    log that it is unsupported (the pipeline checks a fixed dict of model names, which ``AutoModel.register`` does
    not reach). Runs on import: with the installed package and with remote code alike."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
    except ImportError:  # a transformers layout without it: the pipeline only logs a warning then
        return
    MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(
        SparseSemiDetrConfig.model_type, SparseSemiDetrForObjectDetection.__name__
    )


_declare_object_detection_support()
