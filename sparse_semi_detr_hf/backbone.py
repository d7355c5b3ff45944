"""Backbone (timm, ``features_only``) and the 4-level neck of DINO.

The backbone returns the maps at ``config.backbone_out_indices`` (strides 8/16/32 for ResNets); the neck maps
each to ``d_model`` channels with a 1x1 conv + GroupNorm and adds ``num_feature_levels - len(out_indices)``
extra levels with 3x3 stride-2 convs + GroupNorm (the first on the last backbone map).
"""

import logging

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def _mark_initialized(module: nn.Module) -> None:
    """Tell transformers' weight initialisation to leave timm's own initialisation alone."""
    for sub in module.modules():
        sub._is_hf_initialized = True
        for tensor in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False)):
            tensor._is_hf_initialized = True


class TimmBackbone(nn.Module):
    """A timm model in ``features_only`` mode, with optionally frozen BatchNorm.

    ``forward(pixel_values (B, C, H, W)) -> list[(B, C_l, H / s_l, W / s_l)]`` for each out index.
    """

    def __init__(self, config):
        super().__init__()
        self.model_name = config.backbone
        self.out_indices = tuple(config.backbone_out_indices)
        self.timm_kwargs = dict(in_chans=config.num_channels, **config.backbone_kwargs)
        self.body = self._create(pretrained=False)
        if config.freeze_backbone_batch_norm:
            self.body = freeze_batch_norm_2d(self.body)
        self.frozen_stages = config.backbone_frozen_stages
        freeze_stages_(self.body, self.frozen_stages, self.model_name)
        self.channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())
        _mark_initialized(self.body)

    def _create(self, pretrained: bool) -> nn.Module:
        try:
            return timm.create_model(
                self.model_name, pretrained=pretrained, features_only=True, out_indices=self.out_indices,
                **self.timm_kwargs,
            )
        except (IndexError, AssertionError, ValueError) as error:
            raise ValueError(
                f"backbone_out_indices={list(self.out_indices)} do not fit backbone {self.model_name!r}: {error}"
            ) from error

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        return self.body(pixel_values)

    def load_pretrained_weights(self) -> None:
        """Copy timm's ImageNet weights into the backbone (downloads through timm / the Hub on first use)."""
        pretrained = self._create(pretrained=True)
        source = pretrained.state_dict()
        missing, unexpected = self.body.load_state_dict(source, strict=False)
        # Frozen BN keeps weight/bias/running stats under the same names, only num_batches_tracked disappears.
        missing = [key for key in missing if not key.endswith("num_batches_tracked")]
        if missing:
            raise RuntimeError(f"pretrained {self.model_name} lacks backbone weights: {missing[:5]}")
        logger.info("loaded ImageNet weights for %s (%d unused keys)", self.model_name, len(unexpected))


def freeze_stages_(body: nn.Module, stages: int, name: str = "backbone") -> None:
    """Stop training the stem and the first ``stages`` stages of a ResNet-style trunk (``requires_grad=False``).

    The stem is every child before ``layer1`` (conv1/bn1 or timm's deep stem); ``stages = 0`` freezes nothing.
    """
    if stages <= 0:
        return
    children = [child for child, _ in body.named_children()]
    if f"layer{stages}" not in children:
        raise ValueError(f"backbone_frozen_stages={stages} needs a ResNet-style backbone with a 'layer{stages}' "
                         f"stage; {name!r} has {children}. Set backbone_frozen_stages=0.")
    for child_name, child in body.named_children():
        child.requires_grad_(False)
        if child_name == f"layer{stages}":
            break


class Neck(nn.Module):
    """Per-level projection to ``d_model`` plus extra stride-2 levels (DINO's ``input_proj``)."""

    def __init__(self, in_channels: list[int], config):
        super().__init__()
        d_model, groups = config.d_model, config.neck_group_norm_groups
        layers = [
            nn.Sequential(nn.Conv2d(channels, d_model, kernel_size=1), nn.GroupNorm(groups, d_model))
            for channels in in_channels
        ]
        extra_in = in_channels[-1]
        for _ in range(config.num_feature_levels - len(in_channels)):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(extra_in, d_model, kernel_size=3, stride=2, padding=1), nn.GroupNorm(groups, d_model)
                )
            )
            extra_in = d_model
        self.layers = nn.ModuleList(layers)
        self.num_backbone_levels = len(in_channels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """``features``: backbone maps -> ``num_feature_levels`` maps of ``(B, d_model, H_l, W_l)``."""
        outputs = [layer(feature) for layer, feature in zip(self.layers, features)]
        last = features[-1]
        for layer in self.layers[self.num_backbone_levels:]:
            last = layer(last)
            outputs.append(last)
        return outputs


def downsample_padding_mask(padding_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, H, W)`` bool (True = padding) -> ``(B, h, w)`` bool by nearest interpolation."""
    return F.interpolate(padding_mask[:, None].to(torch.float32), size=size).to(torch.bool)[:, 0]
