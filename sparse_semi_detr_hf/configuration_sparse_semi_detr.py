"""Configuration of Sparse Semi-DETR (a DINO detector with the Sparse Semi-DETR query modules).

Every setting of SPEC §1 (detector), §3 (Query Refinement Module) and §4 (Reliable Pseudo-Label
Filtering) is a field here with the paper's default, so an ablation is one keyword away. Trainer-only
settings (EMA, batch ratio, stage switch step, unsupervised weight) live in the trainer's arguments.
"""

from transformers import PretrainedConfig

QUERY_MODES = ("none", "cross_view", "refined")
ATTENTION_BACKENDS = ("auto", "pytorch", "triton")
QRM_ATTENTION_ON = ("low", "high", "both", "none")


class SparseSemiDetrConfig(PretrainedConfig):
    r"""
    Args:
        num_labels (`int`, defaults to 91 via `id2label`/`num_labels`): number of object classes (no background class).
        backbone (`str`, defaults to `"resnet50.tv_in1k"`): timm model name, built with `features_only=True`. The
            default is torchvision's ImageNet ResNet-50 (v1), the start of DINO, Deformable DETR and Semi-DETR
            (timm's plain `"resnet50"` loads `resnet50.a1_in1k`, another training recipe).
        backbone_frozen_stages (`int`, defaults to 1): backbone stages whose parameters are frozen (not trained):
            0 none, 1 the stem and `layer1` (DINO's setting for an ImageNet start), `n` the stem and `layer1..n`.
            ResNet-style timm backbones only (children named `layer1`, `layer2`, ...). Train randomly initialised
            backbones with 0.
        backbone_out_indices (`list[int]`, defaults to `[2, 3, 4]`): timm feature indices (strides 8/16/32 on ResNets).
        backbone_kwargs (`dict`, *optional*): extra keyword arguments for `timm.create_model`.
        use_pretrained_backbone (`bool`, defaults to `False`): the backbone should start from timm's ImageNet weights.
            Building a model never downloads anything; the trainer (or `model.load_pretrained_backbone()`) does.
        freeze_backbone_batch_norm (`bool`, defaults to `True`): replace the backbone's BatchNorm by frozen BN (paper
            setting with pretrained weights). Set `False` to train from scratch (random BN is not a normalizer).
        num_channels (`int`, defaults to 3): input channels.
        d_model (`int`, defaults to 256): transformer width.
        num_feature_levels (`int`, defaults to 4): neck levels (backbone levels + extra stride-2 convs).
        neck_group_norm_groups (`int`, defaults to 32): GroupNorm groups in the neck.
        position_embedding_temperature (`float`, defaults to 20): sine embedding temperature (DINO).
        encoder_layers / decoder_layers (`int`, defaults to 6 / 6).
        encoder_attention_heads / decoder_attention_heads (`int`, defaults to 8 / 8).
        encoder_n_points / decoder_n_points (`int`, defaults to 4 / 4): sampling points per head and level.
        encoder_ffn_dim / decoder_ffn_dim (`int`, defaults to 2048 / 2048).
        dropout (`float`, defaults to 0.0); activation_function (`str`, defaults to `"relu"`).
        num_queries (`int`, defaults to 900): matching queries selected from the encoder proposals.
        look_forward_twice (`bool`, defaults to `True`): DINO's box refinement gradient path.
        decoder_reference_from_normed (`bool`, defaults to `False`): `False` (DINO): the next decoder layer's
            reference box comes from the box head applied to the layer output *before* the decoder's final
            LayerNorm, the predicted box from the normed output (DINO applies the box head twice). `True`: both
            from the normed output (this package's rule before it matched DINO; models saved then carry `True`).
        inverse_sigmoid_eps (`float`, defaults to 1e-3): clamp of the decoder's box logits (`logit(ref)`), DINO's
            value (models saved before it was a field used 1e-5 and carry it).
        num_denoising_queries (`int`, defaults to 100): contrastive denoising budget (`dn_number`).
        label_noise_ratio (`float`, defaults to 0.5): labels are flipped with probability `ratio * 0.5`.
        denoising_padding_is_background (`bool`, defaults to `True`): the padding slots of the denoising groups (an
            image with fewer targets than the batch maximum) are background in the classification loss, as in DINO;
            `False` leaves them out of the loss (this package's rule before it matched DINO).
        box_noise_scale (`float`, defaults to 0.4): Semi-DETR's value (DINO/detrex use 1.0).
        class_loss_coefficient / bbox_loss_coefficient / giou_loss_coefficient (`float`, defaults 1.0 / 5.0 / 2.0).
        focal_alpha / focal_gamma (`float`, defaults 0.25 / 2.0).
        matcher_class_cost / matcher_bbox_cost / matcher_giou_cost (`float`, defaults 2.0 / 5.0 / 2.0).
        auxiliary_loss (`bool`, defaults to `True`): losses on every decoder layer.
        encoder_loss (`bool`, defaults to `True`): loss on the selected encoder proposals.
        one_to_many_topk (`int`, defaults to 13): positives per target in the one-to-many stage.
        one_to_many_alpha / one_to_many_beta (`float`, defaults 1.0 / 6.0): alignment t = s^alpha * IoU^beta.
        num_detections (`int`, defaults to 300): top-k (query, class) pairs kept by post-processing (no NMS).
        query_mode (`str`, defaults to `"refined"`): `"none"` (supervised DINO queries only), `"cross_view"`
            (Semi-DETR's projected RoI queries, repeated groups) or `"refined"` (Sparse Semi-DETR's QRM).
        cross_view_groups (`int`, defaults to 5): repeated groups of Semi-DETR's cross-view queries.
        qrm_roi_size (`int`, defaults to 7): RoIAlign output size.
        qrm_high_res_level / qrm_low_res_level (`int`, defaults 0 / 2): neck levels (stride 8 / 32) pooled by the QRM.
        qrm_reduced_dim (`int`, defaults to 64): channels of the low-resolution set before attention.
        qrm_attention_heads (`int`, defaults to 8).
        qrm_attention_on (`str`, defaults to `"low"`): which set gets attention (`low|high|both|none`), Table 10.
        qrm_use_similarity (`bool`, defaults to `True`): similarity matching that refines and drops queries (Table 11).
        qrm_mlp_projector (`bool`, defaults to `False`): the paper's "MLP" ablation (Table 5(c)): both RoI sets first
            go through Semi-DETR's projector convolutions (conv3x3-BN-ReLU, twice); the paper found it worse. Only
            with `query_mode="refined"` (the cross-view projector has these convolutions anyway).
        qrm_similarity_threshold (`float`, defaults to -1.0): queries whose best cosine similarity is below are dropped
            (-1 disables the threshold; partner collisions still drop duplicates).
        qrm_alignment_temperature (`float`, defaults to 0.1): temperature of the QRM's alignment (InfoNCE) loss.
        qrm_alignment_loss_coefficient (`float`, defaults to 1.0): weight of that loss (0 disables it); it teaches the
            similarity step that a box's own high-resolution feature is its partner (docs/method.md).
        consistency_loss_coefficient (`float`, defaults to 10.0): weight of the student/teacher query consistency.
        consistency_see_matching (`bool`, defaults to `True`): extra query groups may attend to matching queries.
        pseudo_label_threshold (`float`, defaults to 0.4): teacher score threshold tau.
        pseudo_label_mean_std_filter (`bool`, defaults to `False`): Semi-DETR's adaptive pre-filter: a pseudo-label
            also needs a score >= mean + std of its image's candidates (scores >= 0.01, after the NMS).
        one_to_many_nms_iou (`float`, defaults to 0.6): class-wise NMS IoU of the one-to-many stage, whose
            predictions duplicate each other: applied to the teacher's pseudo-labels, to the evaluation and by the
            image processor of a model exported from that stage (Semi-DETR's 0.6; 1.0 keeps every box).
        use_rpf (`bool`, defaults to `True`): Reliable Pseudo-Label Filtering on/off.
        rpf_groups (`int`, defaults to 6): m groups of (jittered) pseudo-labels.
        rpf_topk (`int`, defaults to 4): positives kept per pseudo-box.
        rpf_jitter (`float`, defaults to 0.1): jitter of the augmented copies, as a fraction of the box size.
        rpf_duplicate_iou (`float`, defaults to 0.7): IoU above which a pseudo-box can be a duplicate of another.
        rpf_joint_matching (`bool`, defaults to `True`): match the m groups of pseudo-labels in one assignment
            (H-DETR's repeated targets, each copy a distinct prediction; SPEC §4) instead of each group separately
            (the earlier reading, under which the copies mostly pick the same prediction; docs/method.md). Both
            sides of RPF: the one-to-many candidates and the one-to-one duplicate rule.
        rpf_ignore_duplicates (`bool`, defaults to `True`): a pseudo-box's candidates outside its top-k get no
            classification loss (SPEC §4 step 5); `False` treats them as background like any other prediction
            (an ablation: RPF's positives without its duplicate rule).
        deformable_attention_backend (`str`, defaults to `"auto"`): `"auto"` (Triton kernel on CUDA when available),
            `"pytorch"` or `"triton"`; the environment variable `SPARSE_SEMI_DETR_ATTENTION_BACKEND` overrides it.
        init_std (`float`, defaults to 0.02); init_xavier_std (`float`, defaults to 1.0).
    """

    model_type = "sparse_semi_detr"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

    def __init__(
        self,
        backbone: str = "resnet50.tv_in1k",
        backbone_frozen_stages: int = 1,
        backbone_out_indices: list[int] | tuple[int, ...] = (2, 3, 4),
        backbone_kwargs: dict | None = None,
        use_pretrained_backbone: bool = False,
        freeze_backbone_batch_norm: bool = True,
        num_channels: int = 3,
        d_model: int = 256,
        num_feature_levels: int = 4,
        neck_group_norm_groups: int = 32,
        position_embedding_temperature: float = 20.0,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        encoder_attention_heads: int = 8,
        decoder_attention_heads: int = 8,
        encoder_n_points: int = 4,
        decoder_n_points: int = 4,
        encoder_ffn_dim: int = 2048,
        decoder_ffn_dim: int = 2048,
        dropout: float = 0.0,
        activation_function: str = "relu",
        num_queries: int = 900,
        look_forward_twice: bool = True,
        decoder_reference_from_normed: bool = False,
        denoising_padding_is_background: bool = True,
        inverse_sigmoid_eps: float = 1e-3,
        num_denoising_queries: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 0.4,
        class_loss_coefficient: float = 1.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        matcher_class_cost: float = 2.0,
        matcher_bbox_cost: float = 5.0,
        matcher_giou_cost: float = 2.0,
        auxiliary_loss: bool = True,
        encoder_loss: bool = True,
        one_to_many_topk: int = 13,
        one_to_many_alpha: float = 1.0,
        one_to_many_beta: float = 6.0,
        num_detections: int = 300,
        query_mode: str = "refined",
        cross_view_groups: int = 5,
        qrm_roi_size: int = 7,
        qrm_high_res_level: int = 0,
        qrm_low_res_level: int = 2,
        qrm_reduced_dim: int = 64,
        qrm_attention_heads: int = 8,
        qrm_attention_on: str = "low",
        qrm_use_similarity: bool = True,
        qrm_mlp_projector: bool = False,
        qrm_similarity_threshold: float = -1.0,
        qrm_alignment_temperature: float = 0.1,
        qrm_alignment_loss_coefficient: float = 1.0,
        consistency_loss_coefficient: float = 10.0,
        consistency_see_matching: bool = True,
        pseudo_label_threshold: float = 0.4,
        pseudo_label_mean_std_filter: bool = False,
        one_to_many_nms_iou: float = 0.6,
        use_rpf: bool = True,
        rpf_groups: int = 6,
        rpf_topk: int = 4,
        rpf_jitter: float = 0.1,
        rpf_duplicate_iou: float = 0.7,
        rpf_joint_matching: bool = True,
        rpf_ignore_duplicates: bool = True,
        deformable_attention_backend: str = "auto",
        init_std: float = 0.02,
        init_xavier_std: float = 1.0,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_frozen_stages = int(backbone_frozen_stages)
        self.backbone_out_indices = list(backbone_out_indices)
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.use_pretrained_backbone = use_pretrained_backbone
        self.freeze_backbone_batch_norm = freeze_backbone_batch_norm
        self.num_channels = num_channels
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.neck_group_norm_groups = neck_group_norm_groups
        self.position_embedding_temperature = position_embedding_temperature
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_attention_heads = decoder_attention_heads
        self.encoder_n_points = encoder_n_points
        self.decoder_n_points = decoder_n_points
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_ffn_dim = decoder_ffn_dim
        self.dropout = dropout
        self.activation_function = activation_function
        self.num_queries = num_queries
        self.look_forward_twice = look_forward_twice
        self.decoder_reference_from_normed = bool(decoder_reference_from_normed)
        self.denoising_padding_is_background = bool(denoising_padding_is_background)
        self.inverse_sigmoid_eps = float(inverse_sigmoid_eps)
        self.num_denoising_queries = num_denoising_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.class_loss_coefficient = class_loss_coefficient
        self.bbox_loss_coefficient = bbox_loss_coefficient
        self.giou_loss_coefficient = giou_loss_coefficient
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.matcher_class_cost = matcher_class_cost
        self.matcher_bbox_cost = matcher_bbox_cost
        self.matcher_giou_cost = matcher_giou_cost
        self.auxiliary_loss = auxiliary_loss
        self.encoder_loss = encoder_loss
        self.one_to_many_topk = one_to_many_topk
        self.one_to_many_alpha = one_to_many_alpha
        self.one_to_many_beta = one_to_many_beta
        self.num_detections = num_detections
        self.query_mode = query_mode
        self.cross_view_groups = cross_view_groups
        self.qrm_roi_size = qrm_roi_size
        self.qrm_high_res_level = qrm_high_res_level
        self.qrm_low_res_level = qrm_low_res_level
        self.qrm_reduced_dim = qrm_reduced_dim
        self.qrm_attention_heads = qrm_attention_heads
        self.qrm_attention_on = qrm_attention_on
        self.qrm_use_similarity = qrm_use_similarity
        self.qrm_mlp_projector = qrm_mlp_projector
        self.qrm_similarity_threshold = qrm_similarity_threshold
        self.qrm_alignment_temperature = qrm_alignment_temperature
        self.qrm_alignment_loss_coefficient = qrm_alignment_loss_coefficient
        self.consistency_loss_coefficient = consistency_loss_coefficient
        self.consistency_see_matching = consistency_see_matching
        self.pseudo_label_threshold = pseudo_label_threshold
        self.pseudo_label_mean_std_filter = bool(pseudo_label_mean_std_filter)
        self.one_to_many_nms_iou = one_to_many_nms_iou
        self.use_rpf = use_rpf
        self.rpf_groups = rpf_groups
        self.rpf_topk = rpf_topk
        self.rpf_jitter = rpf_jitter
        self.rpf_duplicate_iou = rpf_duplicate_iou
        self.rpf_joint_matching = bool(rpf_joint_matching)
        self.rpf_ignore_duplicates = bool(rpf_ignore_duplicates)
        self.deformable_attention_backend = deformable_attention_backend
        self.init_std = init_std
        self.init_xavier_std = init_xavier_std
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 91
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for invalid values or combinations."""
        _positive_ints(self, "d_model", "num_feature_levels", "encoder_layers", "decoder_layers",
                       "encoder_attention_heads", "decoder_attention_heads", "encoder_n_points", "decoder_n_points",
                       "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "num_detections", "qrm_roi_size",
                       "qrm_reduced_dim", "qrm_attention_heads", "rpf_groups", "rpf_topk", "one_to_many_topk",
                       "cross_view_groups", "num_channels")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (got {self.num_labels}): a detector needs at least one class.")
        for heads_field in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, heads_field)
            if self.d_model % heads:
                raise ValueError(f"{heads_field}={heads} does not divide d_model={self.d_model}.")
        if self.d_model % 4:
            raise ValueError(f"d_model={self.d_model} must be divisible by 4 (sine embedding of 4-d anchors).")
        if self.d_model % self.neck_group_norm_groups:
            raise ValueError(
                f"neck_group_norm_groups={self.neck_group_norm_groups} does not divide d_model={self.d_model}."
            )
        if not self.backbone_out_indices:
            raise ValueError("backbone_out_indices must name at least one backbone level.")
        if self.num_feature_levels < len(self.backbone_out_indices):
            raise ValueError(
                f"num_feature_levels={self.num_feature_levels} is smaller than the number of backbone levels "
                f"(backbone_out_indices={self.backbone_out_indices})."
            )
        for level_field in ("qrm_high_res_level", "qrm_low_res_level"):
            level = getattr(self, level_field)
            if not 0 <= level < self.num_feature_levels:
                raise ValueError(f"{level_field}={level} is not a neck level (0..{self.num_feature_levels - 1}).")
        if self.qrm_reduced_dim % self.qrm_attention_heads:
            raise ValueError(
                f"qrm_attention_heads={self.qrm_attention_heads} does not divide "
                f"qrm_reduced_dim={self.qrm_reduced_dim}."
            )
        _choice(self, "query_mode", QUERY_MODES)
        _choice(self, "deformable_attention_backend", ATTENTION_BACKENDS)
        _choice(self, "qrm_attention_on", QRM_ATTENTION_ON)
        _unit_interval(self, "label_noise_ratio", "focal_alpha", "pseudo_label_threshold", "rpf_duplicate_iou",
                       "dropout")
        if not 0.0 < self.one_to_many_nms_iou <= 1.0:
            raise ValueError(f"one_to_many_nms_iou must lie in (0, 1] (got {self.one_to_many_nms_iou}).")
        for field in ("box_noise_scale", "rpf_jitter", "num_denoising_queries", "qrm_alignment_loss_coefficient"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0 (got {getattr(self, field)}).")
        if not -1.0 <= self.qrm_similarity_threshold <= 1.0:
            raise ValueError(f"qrm_similarity_threshold must lie in [-1, 1] (got {self.qrm_similarity_threshold}).")
        if not self.qrm_alignment_temperature > 0:
            raise ValueError(f"qrm_alignment_temperature must be > 0 (got {self.qrm_alignment_temperature}).")

    @property
    def num_backbone_levels(self) -> int:
        return len(self.backbone_out_indices)


def _positive_ints(config, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field} must be a positive integer (got {value!r}).")


def _unit_interval(config, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{field} must lie in [0, 1] (got {value}).")


def _choice(config, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, field)
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {choices}.")
