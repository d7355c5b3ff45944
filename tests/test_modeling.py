"""Tiny-config tests of the detector: shapes, loss bookkeeping, query-group isolation, save/load."""

import math

import pytest
import torch
from conftest import random_targets, save_without, tiny_config_kwargs

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection
from sparse_semi_detr_hf.query_groups import QueryGroup, build_decoder_attention_mask


def make_model(**overrides) -> SparseSemiDetrForObjectDetection:
    torch.manual_seed(0)
    return SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(**overrides)))


def make_inputs(batch_size: int = 2, size: int = 64):
    pixel_values = torch.randn(batch_size, 3, size, size)
    pixel_mask = torch.ones(batch_size, size, size, dtype=torch.long)
    pixel_mask[-1, :, size - 16:] = 0  # last image is padded on the right
    return pixel_values, pixel_mask


def test_output_shapes_and_weighted_loss():
    model = make_model().train()
    pixel_values, pixel_mask = make_inputs()
    labels = random_targets(2, [3, 1])
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
    config = model.config
    assert out.logits.shape == (2, config.num_queries, config.num_labels)
    assert out.pred_boxes.shape == (2, config.num_queries, 4)
    assert len(out.auxiliary_outputs) == config.decoder_layers - 1
    assert out.intermediate_hidden_states.shape == (2, config.decoder_layers, config.num_queries, config.d_model)
    assert out.intermediate_logits.shape == (2, config.decoder_layers, config.num_queries, config.num_labels)
    assert out.decoder_hidden_states is None  # only with output_hidden_states
    assert out.enc_outputs_class.shape == (2, config.num_queries, config.num_labels)
    assert out.denoising_meta.pad_size == 3
    assert out.dn_logits.shape[2] == out.denoising_meta.num_queries
    assert torch.isfinite(out.loss)
    weights = model.criterion.weight_dict
    expected = sum(weights[key] * value for key, value in out.loss_dict.items())
    torch.testing.assert_close(out.loss, expected)
    for suffix in ("", "_0", "_enc", "_dn", "_dn_0"):
        assert f"loss_ce{suffix}" in out.loss_dict and f"loss_giou{suffix}" in out.loss_dict


def test_backward_reaches_every_detector_parameter():
    model = make_model(query_mode="none").train()
    pixel_values, pixel_mask = make_inputs()
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=random_targets(2, [2, 2]))
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_zero_targets_give_background_only_loss():
    model = make_model().train()
    pixel_values, pixel_mask = make_inputs()
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=random_targets(2, [0, 0]))
    assert out.denoising_meta is None
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.loss_dict["loss_bbox"] == 0 and out.loss_dict["loss_giou"] == 0
    out.loss.backward()
    assert model.model.label_embedding.weight.grad is not None  # kept in the graph for DDP


def test_denoising_queries_do_not_change_matching_outputs():
    model = make_model().eval()
    pixel_values, pixel_mask = make_inputs()
    labels = random_targets(2, [3, 2])
    with torch.no_grad():
        plain = model(pixel_values=pixel_values, pixel_mask=pixel_mask, denoising=False)
        with_dn = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels, denoising=True)
        other_labels = random_targets(2, [3, 2])
        with_other_dn = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=other_labels, denoising=True)
    assert with_dn.dn_logits is not None
    torch.testing.assert_close(with_dn.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn.pred_boxes, plain.pred_boxes, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_dn.dn_boxes, with_other_dn.dn_boxes)  # the denoising queries did change


def test_extra_groups_are_isolated_from_matching_and_each_other():
    model = make_model().eval()
    pixel_values, pixel_mask = make_inputs()
    d = model.config.d_model

    def group(seed: int) -> QueryGroup:
        g = torch.Generator().manual_seed(seed)
        valid = torch.tensor([[True, True, False], [True, False, False]])
        return QueryGroup(torch.randn(2, 3, d, generator=g), torch.rand(2, 3, 4, generator=g) * 0.5 + 0.25, valid)

    with torch.no_grad():
        state = model.model.encode(pixel_values, pixel_mask)
        plain = model.model.decode(state)
        first = model.model.decode(state, extra_query_groups=[group(1), group(2)])
        second = model.model.decode(state, extra_query_groups=[group(3), group(2)])
    torch.testing.assert_close(first.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.groups[1].hidden_states, second.groups[1].hidden_states, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first.groups[0].hidden_states, second.groups[0].hidden_states)
    # A padded slot does not influence the valid queries of its own group.
    third_group = group(1)
    third_group.content[0, 2] += 100.0
    with torch.no_grad():
        third = model.model.decode(state, extra_query_groups=[third_group, group(2)])
    torch.testing.assert_close(
        third.groups[0].hidden_states[:, 0, :2], first.groups[0].hidden_states[:, 0, :2], atol=1e-5, rtol=1e-5
    )


def test_attention_mask_block_structure():
    valid = torch.tensor([[True, False]])
    groups = [QueryGroup(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), valid, see_matching=True)]
    mask = build_decoder_attention_mask(groups, num_denoising_groups=2, denoising_group_size=2, num_matching=3,
                                        device="cpu")[0, 0]
    assert mask.shape == (9, 9)
    matching = slice(6, 9)
    assert mask[matching, matching].all() and not mask[matching, :6].any()
    assert mask[0, 0] and not mask[0, 1] and mask[0, matching].all()  # valid query sees itself + matching
    assert mask[1, 1] and not mask[1, 0] and not mask[1, matching].any()  # padded row sees only itself
    assert mask[2:4, 2:4].all() and not mask[2:4, 4:6].any() and not mask[4:6, 2:4].any()  # dn groups apart
    assert mask[2:6, matching].all() and not mask[2:6, 0:2].any()
    assert build_decoder_attention_mask([], 0, 0, 5, "cpu") is None


def test_save_and_load_give_identical_logits(tmp_path):
    model = make_model().eval()
    pixel_values, pixel_mask = make_inputs()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask).logits
    model.save_pretrained(tmp_path)
    reloaded = SparseSemiDetrForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        actual = reloaded(pixel_values=pixel_values, pixel_mask=pixel_mask).logits
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.parametrize("query_mode", ["cross_view", "refined"])
def test_modules_missing_from_a_checkpoint_get_fresh_norm_statistics(tmp_path, query_mode):
    """Bug fixed: a supervised model loaded with a query module left that module's BatchNorm running statistics as
    uninitialized memory (running_var ~ -1e34, num_batches_tracked ~ 1e14 measured), so Semi-DETR runs started
    from a supervised burn-in went NaN at the first batch with a single pseudo-box (running statistics used).
    cross_view: every BatchNorm buffer of the query module equals a fresh model's; refined (LayerNorm only, no
    buffers): its norms' weights and biases are the initial 1 and 0 and all its parameters are finite."""
    make_model(query_mode="none").save_pretrained(tmp_path)
    config = SparseSemiDetrConfig(**tiny_config_kwargs(query_mode=query_mode))
    loaded = SparseSemiDetrForObjectDetection.from_pretrained(tmp_path, config=config)
    fresh = SparseSemiDetrForObjectDetection(config)
    buffers = dict(fresh.named_buffers())
    checked = 0
    for name, buffer in loaded.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], atol=0, rtol=0, msg=name)
        checked += "query_module" in name and "running_var" in name
    norms = [(name, module) for name, module in fresh.model.query_module.named_modules()
             if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm))]
    batch_norms = [name for name, module in norms if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    assert checked == len(batch_norms)  # every BatchNorm of the missing module was compared
    if query_mode == "cross_view":
        assert len(batch_norms) >= 2
    else:  # the refined module normalizes with LayerNorm only: no running statistics (no buffers) to check, so
        # check instead that its norms' affine parameters are fresh (weight 1, bias 0), not uninitialized memory
        assert not batch_norms and not list(fresh.model.query_module.buffers()) and norms
    loaded_params = dict(loaded.model.query_module.named_parameters())
    for name, module in norms:
        for key, value in ((f"{name}.weight", 1.0), (f"{name}.bias", 0.0)):
            torch.testing.assert_close(loaded_params[key].detach(), torch.full_like(loaded_params[key], value),
                                       atol=0, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert all(torch.isfinite(value).all() for value in loaded_params.values())


def test_class_heads_remade_for_a_new_label_set_start_at_the_focal_prior(tmp_path):
    """Bug fixed: ``from_pretrained(..., num_labels=5, ignore_mismatched_sizes=True)`` (fine-tuning on new classes,
    also what the trainer does when the label set changes) gave the re-made class heads bias 0 (score 0.5 for every
    query and class): a first-step loss of 145 instead of ~18, measured on the demo burn-in."""
    make_model().save_pretrained(tmp_path)
    relabeled = SparseSemiDetrForObjectDetection.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    prior = torch.full((5,), -math.log(99))
    for head in (relabeled.model.class_head, relabeled.model.query_selection.class_head):
        assert head.weight.shape == (5, relabeled.config.d_model)
        torch.testing.assert_close(head.bias.detach(), prior)
    kept = make_model()  # loaded weights are not re-initialized
    torch.testing.assert_close(relabeled.model.box_head.layers[0].weight, kept.model.box_head.layers[0].weight)
    with torch.no_grad():
        out = relabeled(pixel_values=torch.randn(2, 3, 64, 64), labels=random_targets(2, [0, 0]))
    assert out.loss_dict["loss_ce_enc"] < 1.0


PARTIAL_PREFIXES = ("model.box_head.", "model.query_selection.box_head.layers.2.", "model.encoder.layers.0.self_attn.",
                    "model.query_selection.content_queries.")


def test_modules_missing_from_a_checkpoint_get_dino_init(tmp_path):
    """Bug fixed: a box head, deformable attention or the content queries missing from a checkpoint (transformers
    then initializes only those modules) got the generic Linear / Embedding init: box heads' last layer not zero,
    sampling offsets without the head directions, attention weights not zero, content queries N(0, 1). DINO's rules
    ran only from the parent ``SparseSemiDetrModel`` branch, which transformers does not call then."""
    trained = make_model()
    with torch.no_grad():  # as after training: nothing is at its init value any more
        for parameter in trained.parameters():
            parameter.add_(0.1)
    dropped = save_without(trained, tmp_path, PARTIAL_PREFIXES)
    assert len(dropped) == 6 + 2 + 8 + 1
    loaded = SparseSemiDetrForObjectDetection.from_pretrained(tmp_path)
    fresh = make_model()
    for head in (loaded.model.box_head, loaded.model.query_selection.box_head):
        assert head.layers[-1].weight.abs().sum() == 0 and head.layers[-1].bias.abs().sum() == 0
    attention = loaded.model.encoder.layers[0].self_attn
    assert attention.sampling_offsets.weight.abs().sum() == 0
    torch.testing.assert_close(attention.sampling_offsets.bias, fresh.model.encoder.layers[0].self_attn.sampling_offsets.bias)
    assert attention.sampling_offsets.bias.abs().max() == loaded.config.encoder_n_points  # head directions x point
    assert attention.attention_weights.weight.abs().sum() == 0 and attention.attention_weights.bias.abs().sum() == 0
    content = loaded.model.query_selection.content_queries.weight
    assert content.abs().max() <= math.sqrt(6 / sum(content.shape))  # Xavier-uniform, not N(0, 1)
    # what the checkpoint holds is loaded as it is
    torch.testing.assert_close(loaded.model.query_selection.box_head.layers[0].weight,
                               trained.model.query_selection.box_head.layers[0].weight)
    torch.testing.assert_close(loaded.model.encoder.layers[1].self_attn.sampling_offsets.bias,
                               trained.model.encoder.layers[1].self_attn.sampling_offsets.bias)


def test_return_dict_false_gives_tuple():
    model = make_model().eval()
    pixel_values, pixel_mask = make_inputs(1)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape[-1] == model.config.num_labels


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_model": 30, "encoder_attention_heads": 4}, "encoder_attention_heads"),
        ({"num_labels": 0}, "num_labels"),
        ({"num_feature_levels": 2}, "num_feature_levels"),
        ({"query_mode": "dense"}, "query_mode"),
        ({"qrm_low_res_level": 7}, "qrm_low_res_level"),
        ({"num_queries": 0}, "num_queries"),
        ({"pseudo_label_threshold": 1.5}, "pseudo_label_threshold"),
        ({"qrm_similarity_threshold": 1.5}, "qrm_similarity_threshold"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SparseSemiDetrConfig(**kwargs)


def test_backbone_out_indices_that_do_not_fit_are_reported():
    with pytest.raises(ValueError, match="backbone_out_indices"):
        make_model(backbone_out_indices=[2, 3, 9])


def test_default_config_builds_and_runs_offline():
    config = SparseSemiDetrConfig()
    assert (config.backbone, config.num_queries, config.d_model, config.encoder_layers) == \
        ("resnet50.tv_in1k", 900, 256, 6)
    model = SparseSemiDetrForObjectDetection(config).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 320, 320))
    assert out.logits.shape == (1, 900, config.num_labels)
    assert torch.isfinite(out.pred_boxes).all()


def test_default_backbone_freezes_stem_and_layer1_like_dino():
    """DINO starts from torchvision's ResNet-50 with the stem and layer1 frozen: no gradient, not optimized."""
    model = SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(backbone_frozen_stages=1)))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    body = "model.backbone.body."
    assert frozen and all(name.startswith((body + "conv1", body + "bn1", body + "layer1.")) for name in frozen)
    assert any(name.startswith(body + "layer1.") for name in frozen) and any(name.startswith(body + "conv1")
                                                                          for name in frozen)
    assert all(p.requires_grad for name, p in model.named_parameters() if name.startswith(body + "layer2."))
    model.train()(pixel_values=torch.randn(1, 3, 64, 64),
                  labels=[{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
                  ).loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name in frozen)
    assert model.model.backbone.body.layer2[0].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="backbone_frozen_stages"):
        SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(backbone_frozen_stages=7)))


def test_content_queries_are_xavier_initialised_like_dino():
    model = SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(num_queries=300, d_model=64,
                                                                                       neck_group_norm_groups=8)))
    weight = model.model.query_selection.content_queries.weight
    bound = (6 / (300 + 64)) ** 0.5  # xavier_uniform_ on a (300, 64) matrix
    assert weight.abs().max() <= bound and weight.std() > 0.5 * bound / 3 ** 0.5
    assert model.model.label_embedding.weight.std() > 0.5  # the denoising label embedding stays N(0, 1)


def test_decoder_reference_rule_old_models_keep_theirs():
    """``decoder_reference_from_normed`` changes the boxes of layers after the first only (DINO's rule is the
    default; the shipped demo burn-in was trained with the old rule and says so in its config)."""
    outputs = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = SparseSemiDetrForObjectDetection(
            SparseSemiDetrConfig(**tiny_config_kwargs(decoder_reference_from_normed=flag))).eval()
        for layer in model.model.decoder.layers:  # non-trivial LayerNorm so that normed != pre-norm
            torch.nn.init.normal_(layer.norm_ffn.weight, 1.0, 0.5)
        torch.nn.init.normal_(model.model.box_head.layers[-1].weight, 0.0, 0.1)
        with torch.no_grad():
            outputs[flag] = model(pixel_values=torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(outputs[False].intermediate_boxes[:, 0], outputs[True].intermediate_boxes[:, 0])
    assert not torch.allclose(outputs[False].pred_boxes, outputs[True].pred_boxes)
    from sparse_semi_detr_hf.training.arguments import DEMO_BURNIN_DIR
    demo = SparseSemiDetrConfig.from_pretrained(DEMO_BURNIN_DIR)
    assert demo.decoder_reference_from_normed and demo.inverse_sigmoid_eps == 1e-5 and demo.backbone_frozen_stages == 0


def test_dino_initialisation_reaches_parameterless_containers():
    """Regression: transformers skips _init_weights on modules without own parameters (deformable attention,
    query selection), which left the encoder class head at bias 0 (a focal loss of ~1000 on empty images)."""
    model = make_model()
    prior_bias = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    for head in (model.model.query_selection.class_head, model.model.class_head):
        torch.testing.assert_close(head.bias.detach(), prior_bias.expand_as(head.bias))
    for box_head in (model.model.query_selection.box_head, model.model.box_head):
        assert box_head.layers[-1].weight.abs().max() == 0 and box_head.layers[-1].bias.abs().max() == 0
    attention = model.model.encoder.layers[0].self_attn
    assert attention.attention_weights.weight.abs().max() == 0
    assert attention.sampling_offsets.bias.abs().max() > 0
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 64, 64), labels=random_targets(2, [0, 0]))
    assert out.loss_dict["loss_ce_enc"] < 1.0


def test_default_query_refinement_keeps_boxes_with_negative_similarity(monkeypatch):
    """Regression: with the old default qrm_similarity_threshold=0.0 an untrained QRM dropped every query in real
    training (its best cosine similarities were -0.06 to -0.22), so no refined query and no consistency loss
    existed early on. Distinct boxes whose best partner is themselves must survive by default."""
    import sparse_semi_detr_hf.query_refinement as qr

    def negative_similarity(low, high, batch_index):
        same = batch_index[:, None] == batch_index[None, :]
        sim = torch.full((len(batch_index), len(batch_index)), -0.3) + 0.2 * torch.eye(len(batch_index))
        return sim.masked_fill(~same, float("-inf"))

    monkeypatch.setattr(qr, "same_image_similarity", negative_similarity)
    model = make_model(query_mode="refined")
    d, size = model.config.d_model, model.config.qrm_roi_size
    refined = model.model.query_module(torch.randn(6, d, size, size), torch.randn(6, d, size, size),
                                       torch.tensor([0, 0, 0, 1, 1, 1]), torch.rand(6))
    assert refined.keep.tolist() == [0, 1, 2, 3, 4, 5]
