"""Sine embeddings of feature maps and anchors: direct formulas, padding, and transformers' Grounding-DINO copies."""

import math
from types import SimpleNamespace

import pytest
import torch

from sparse_semi_detr_hf.position_encoding import SinePositionEmbedding, anchor_sine_embedding


def _direct_features(value: float, num_pos_feats: int, temperature: float) -> torch.Tensor:
    """Channel k: sin(v / T^(2*(k//2)/F)) for even k, cos(...) for odd k (DETR's dim_t formula)."""
    feats = []
    for k in range(num_pos_feats):
        angle = value / temperature ** (2 * (k // 2) / num_pos_feats)
        feats.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
    return torch.tensor(feats)


def test_sine_embedding_matches_direct_formula():
    height, width, feats = 3, 4, 6
    embed = SinePositionEmbedding(num_pos_feats=feats, temperature=20.0)
    out = embed(torch.zeros(1, height, width, dtype=torch.bool))
    assert out.shape == (1, 2 * feats, height, width)
    for i in range(height):
        for j in range(width):
            y = (i + 1) / (height + 1e-6) * 2 * math.pi
            x = (j + 1) / (width + 1e-6) * 2 * math.pi
            expected = torch.cat([_direct_features(y, feats, 20.0), _direct_features(x, feats, 20.0)])
            torch.testing.assert_close(out[0, :, i, j], expected, atol=1e-5, rtol=1e-5)


def test_padding_normalizes_over_the_valid_region():
    """A padded image's valid region gets exactly the embedding of the unpadded image of that size."""
    embed = SinePositionEmbedding(num_pos_feats=8)
    mask = torch.zeros(2, 6, 7, dtype=torch.bool)
    mask[1, 4:, :] = True  # image 1 is 4 x 5 inside a 6 x 7 canvas
    mask[1, :, 5:] = True
    padded = embed(mask)
    alone = embed(torch.zeros(1, 4, 5, dtype=torch.bool))
    torch.testing.assert_close(padded[1, :, :4, :5], alone[0])
    torch.testing.assert_close(padded[0], embed(mask[:1])[0])
    assert not torch.allclose(padded[0, :, :4, :5], alone[0])  # the unpadded image normalizes differently


def test_sine_embedding_dtype_and_unnormalized_mode():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    assert SinePositionEmbedding(num_pos_feats=4)(mask, dtype=torch.bfloat16).dtype == torch.bfloat16
    raw = SinePositionEmbedding(num_pos_feats=2, temperature=20.0, normalize=False)(mask)
    expected = torch.tensor([math.sin(2.0), math.cos(2.0), math.sin(3.0), math.cos(3.0)])  # y = 2, x = 3
    torch.testing.assert_close(raw[0, :, 1, 2], expected)
    with pytest.raises(ValueError):
        SinePositionEmbedding(num_pos_feats=5)


def test_sine_embedding_matches_transformers_grounding_dino():
    gd = pytest.importorskip("transformers.models.grounding_dino.modeling_grounding_dino")
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[0, 3:] = True
    mask[0, :, 4:] = True
    reference = gd.GroundingDinoSinePositionEmbedding(SimpleNamespace(d_model=32, positional_embedding_temperature=20))
    expected = reference(torch.zeros(2, 3, 5, 6), (~mask).long())
    torch.testing.assert_close(SinePositionEmbedding(num_pos_feats=16)(mask), expected)


def test_anchor_embedding_shape_and_spot_values():
    torch.manual_seed(0)
    anchors = torch.rand(2, 3, 4)
    out = anchor_sine_embedding(anchors, num_pos_feats=8, temperature=10000)
    assert out.shape == (2, 3, 32)
    cx, cy, w, h = anchors[1, 2].tolist()
    for offset, value in ((0, cy), (8, cx), (16, w), (24, h)):  # order y, x, w, h
        expected = _direct_features(value * 2 * math.pi, 8, 10000)
        torch.testing.assert_close(out[1, 2, offset : offset + 8], expected, atol=1e-5, rtol=1e-5)
    assert anchor_sine_embedding(anchors[..., :2], num_pos_feats=8).shape == (2, 3, 16)
    assert anchor_sine_embedding(anchors.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        anchor_sine_embedding(anchors[..., :3])


def test_anchor_embedding_matches_transformers_grounding_dino():
    gd = pytest.importorskip("transformers.models.grounding_dino.modeling_grounding_dino")
    torch.manual_seed(1)
    anchors = torch.rand(2, 7, 4)
    for coords in (anchors, anchors[..., :2]):
        expected = gd.encode_sinusoidal_position_embedding(coords, num_pos_feats=16, temperature=10000)
        torch.testing.assert_close(anchor_sine_embedding(coords, num_pos_feats=16), expected)
