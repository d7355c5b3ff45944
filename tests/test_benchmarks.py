"""Smoke tests of benchmarks/bench_model.py: the CPU preset runs in-process and writes every expected number."""

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_cpu_smoke_preset_writes_all_measurements(bench, tmp_path, monkeypatch):
    monkeypatch.delenv(bench.BACKEND_ENV_VAR, raising=False)
    output = tmp_path / "results.json"
    returned = bench.main(["--preset", "cpu_smoke", "--device", "cpu", "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["meta"]["device"].startswith("CPU")
    for key in ("torch", "transformers", "timm", "command"):
        assert results["meta"][key]
    assert "--preset cpu_smoke" in results["meta"]["command"]
    records = results["records"]
    expected = {(section, model) for section in ("train", "inference")
                for model in ("ours (pytorch)", "anchor (HF Deformable DETR)")}
    assert {(r["section"], r["model"]) for r in records} == expected
    for record in records:
        assert "error" not in record, record.get("error")
        assert (record["dtype"], record["batch"], record["height"], record["width"]) == ("fp32", 1, 128, 128)
        assert len(record["times_ms"]) == 2  # --steps of the preset; the warm-up call is not among them
        assert all(_positive(value) for value in record["times_ms"])
        assert _positive(record["median_ms"]) and _positive(record["images_per_s"]) and _positive(record["vs_anchor"])
        assert record["peak_memory_mib"] is None  # CPU: no allocator statistics
    ours = [r for r in records if r["family"] == "ours"]
    assert all(r["attention_backends"] == ["pytorch"] for r in ours)  # the env var reached the dispatcher
    assert all(r["vs_anchor"] == 1.0 for r in records if r["family"] == "anchor")
    assert results["parameters"]["ours"]["trainable"] > 0 and results["parameters"]["anchor"]["trainable"] > 0
    assert results["table"] == returned["table"] and results["table"].count("\n") == len(records) + 1
    assert bench.BACKEND_ENV_VAR not in __import__("os").environ  # restored after each measurement


def test_anchor_config_matches_every_dimension(bench):
    args = bench.parse_args(["--preset", "cpu_smoke", "--queries", "30", "--layers", "2"])
    ours = bench.build_our_config(args)
    anchor = bench.build_anchor_config(ours)
    for field in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                  "encoder_n_points", "decoder_n_points", "encoder_ffn_dim", "decoder_ffn_dim", "num_feature_levels",
                  "num_queries", "num_labels", "dropout", "activation_function", "auxiliary_loss"):
        assert getattr(anchor, field) == getattr(ours, field), field
    assert anchor.two_stage and anchor.with_box_refine and anchor.two_stage_num_proposals == 30
    assert ours.num_queries == 30 and ours.encoder_layers == 2 and ours.backbone == "resnet18"


def test_preset_defaults_yield_to_explicit_flags(bench):
    args = bench.parse_args(["--preset", "cpu_smoke", "--height", "96", "--infer", "2x64x80,1x32x32"])
    assert (args.batch, args.height, args.width, args.queries) == (1, 96, 128, 50)
    assert args.infer_shapes == [(2, 64, 80), (1, 32, 32)]
    assert args.dtype_list == ["fp32"] and args.backend_list == ["pytorch"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--dtypes", "fp16"])


def test_ratios_and_table(bench):
    def record(family, backend, median, section="train"):
        variant = bench.Variant(family, backend)
        rec = bench.new_record(section, variant, "bf16", (4, 800, 1088))
        rec.update(median_ms=median, images_per_s=4e3 / median, cpu_median_ms=median, peak_memory_mib=1024.0)
        return rec

    records = [record("ours", "triton", 200.0), record("ours", "pytorch", 300.0), record("anchor", None, 250.0)]
    failed = bench.new_record("inference", bench.Variant("anchor"), "bf16", (1, 800, 1333))
    failed["error"] = "OutOfMemoryError: boom"
    bench.add_ratios(records + [failed])
    assert records[0]["vs_anchor"] == pytest.approx(1.25) and records[1]["vs_anchor"] == pytest.approx(250 / 300)
    assert records[0]["triton_speedup"] == pytest.approx(1.5) and "triton_speedup" not in records[1]
    table = bench.markdown_table(records + [failed]).splitlines()
    assert len(table) == 6 and all(line.count("|") == table[0].count("|") for line in table)
    assert "1.25×" in table[2] and "1.50×" in table[2] and "failed: OutOfMemoryError" in table[5]


def test_semi_hook_skips_without_trainer_and_times_a_provided_step(bench, monkeypatch):
    args = bench.parse_args(["--preset", "cpu_smoke", "--steps", "3", "--warmup", "1"])
    module_name = "sparse_semi_detr_hf.training.trainer"
    monkeypatch.setitem(sys.modules, module_name, types.ModuleType(module_name))  # a trainer without the hook
    skipped = bench.time_semi_step(args)
    assert "build_benchmark_step" in skipped["skipped"] and skipped["records"] == []

    calls = []
    import torch

    def build_benchmark_step(config_kwargs, device, height=800, width=1088, autocast_dtype=None):
        assert (config_kwargs["backbone"], config_kwargs["num_queries"], height, width) == ("resnet18", 50, 128, 128)
        assert autocast_dtype is None and str(device) == "cpu"

        def step():  # the attention dispatcher runs in every step, under the backend the benchmark forces
            calls.append(bench.deformable_attention.resolve_backend("triton", torch.zeros(1)))

        return step, 5

    fake = types.ModuleType(module_name)
    fake.build_benchmark_step = build_benchmark_step
    monkeypatch.setitem(sys.modules, module_name, fake)
    refined, cross_view = bench.time_semi_step(args)["records"]
    assert refined["model"] == "ours semi step (refined, pytorch)"
    assert cross_view["model"] == "ours semi step (cross_view, pytorch)"
    semi = refined
    assert "error" not in semi and calls == ["pytorch"] * 8 and len(semi["times_ms"]) == 3
    assert semi["batch"] == 5 and semi["median_ms"] > 0 and semi["attention_backends"] == ["pytorch"]
    assert semi["images_per_s"] == pytest.approx(5e3 / semi["median_ms"])
    # one record per attention backend asked for; a step that ran another backend fails its record
    monkeypatch.setattr(bench.deformable_attention, "resolve_backend", lambda backend, value: "triton")
    args.backend_list = ["pytorch"]
    failed = bench.time_semi_step(args)["records"][0]
    assert "dispatcher ran ['triton']" in failed["error"]


def _load(name: str):
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_tiny_model(path, **overrides) -> None:
    """A random tiny detector saved with ``save_pretrained`` (``test_resnet``, d_model 32, 1 + 1 layers)."""
    import torch
    from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection

    torch.manual_seed(0)
    config = SparseSemiDetrConfig(backbone="test_resnet", d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                                  decoder_attention_heads=2, num_queries=20, num_denoising_queries=0,
                                  num_labels=10, neck_group_norm_groups=8, **overrides)
    SparseSemiDetrForObjectDetection(config).save_pretrained(path)


def test_pseudo_label_rate_reads_only_the_teacher_on_unlabeled_images(tmp_path):
    """The tau calibration on a tiny random model: counts fall as tau rises; labeled boxes come from the split."""
    _save_tiny_model(tmp_path / "model", qrm_reduced_dim=16, qrm_attention_heads=2)
    rate = _load("pseudo_label_rate")
    report = rate.main(["--model", str(tmp_path / "model"), "--images", "6", "--thresholds", "0.0,0.1,0.99",
                        "--", "--synthetic_num_train", "20", "--synthetic_num_val", "2", "--image_scales", "64",
                        "--max_image_size", "80", "--eval_image_size", "64"])
    per_image = report["pseudo_labels_per_image"]
    assert per_image[0.0] == 20 * 10 and per_image[0.0] >= per_image[0.1] >= per_image[0.99] == 0
    assert report["images"] == 6 and report["labeled_boxes_per_image"] > 0
    assert report["largest_tau_reaching"] in (0.0, 0.1)
    assert "hidden_annotations" not in report


def test_pseudo_label_precision_matches_each_annotation_once():
    """The diagnostic's matching (the trainer's ``pseudo_label_quality``): same class, IoU >= 0.5, an annotation
    counted once."""
    import torch

    from sparse_semi_detr_hf.training.pseudo_labels import pseudo_label_quality

    def true_positives(pseudo, target):
        return pseudo_label_quality([pseudo], [target])["num_true_positive"]

    target = {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]),
              "class_labels": torch.tensor([0, 1])}
    pseudo = {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.31, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2],
                                     [0.5, 0.5, 0.1, 0.1]]),
              "class_labels": torch.tensor([0, 0, 0, 1])}
    # first box: match; second: duplicate of the same annotation; third: right place, wrong class; fourth: nowhere
    assert true_positives(pseudo, target) == 1
    pseudo["class_labels"] = torch.tensor([0, 0, 1, 1])
    assert true_positives(pseudo, target) == 2
    assert true_positives({"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)},
                          target) == 0


def test_pseudo_label_rate_reports_precision_against_hidden_annotations(tmp_path):
    _save_tiny_model(tmp_path / "model", qrm_reduced_dim=16, qrm_attention_heads=2)
    rate = _load("pseudo_label_rate")
    report = rate.main(["--model", str(tmp_path / "model"), "--images", "4", "--thresholds", "0.0,0.99",
                        "--hidden_annotations", "--", "--synthetic_num_train", "20", "--synthetic_num_val", "2",
                        "--image_scales", "64", "--max_image_size", "80", "--eval_image_size", "64"])
    hidden = report["hidden_annotations"]
    assert hidden["annotated_boxes_per_image"] > 0
    assert 0.0 <= hidden[0.0]["precision"] <= 1.0 and 0.0 <= hidden[0.0]["recall"] <= 1.0
    assert hidden[0.99] == {"precision": None, "recall": 0.0}


def test_count_rpf_fallbacks_counts_every_rpf_image_set_and_restores_the_matcher(tmp_path, monkeypatch):
    import torch
    from sparse_semi_detr_hf import matcher

    original = matcher._rpf_single
    counter = _load("count_rpf_fallbacks")
    train_args = ["--synthetic_num_train", "20", "--synthetic_num_val", "2", "--synthetic_cache_dir",
                  str(tmp_path / "data"), "--image_scales", "64", "--max_image_size", "80", "--eval_image_size", "64",
                  "--labeled_batch_size", "1", "--unlabeled_batch_size", "2", "--max_steps", "2",
                  "--eval_steps", "100",
                  "--pseudo_label_threshold", "0.0", "--backbone", "test_resnet", "--d_model", "32",
                  "--encoder_layers", "1", "--decoder_layers", "1", "--ffn_dim", "64", "--attention_heads", "2",
                  "--num_queries", "20", "--num_denoising_queries", "0", "--num_detections", "8", "--qrm_reduced_dim",
                  "16", "--config_overrides", "qrm_attention_heads=2", "--num_workers", "0",
                  "--output_dir", str(tmp_path / "run")]
    counts = counter.main(["--counts_output", str(tmp_path / "counts.json"), "--", *train_args])
    assert json.loads((tmp_path / "counts.json").read_text()) == counts
    # 2 steps x 2 unlabeled images x (1 decoder layer + encoder proposals), 8 pseudo-boxes an image (tau = 0)
    assert counts["joint_assignments"] == 8 and counts["image_sets"] == 8 and counts["pseudo_boxes"] == 64
    assert counts["copies_capped"] == 8  # 6 copies x 8 boxes > 20 queries
    assert counts["image_sets_taking_plain_positives"] <= counts["image_sets"] and matcher._rpf_single is original

    def drifted(candidate, t, iou, topk, fallback=True):  # a library rule the counter no longer mirrors
        return matcher._empty_assignment(t.device), torch.zeros(t.shape[0], dtype=torch.bool)

    monkeypatch.setattr(matcher, "_rpf_single", drifted)
    with pytest.raises(RuntimeError, match="no longer recomputes"):
        counter.main(["--", *train_args[:-1], str(tmp_path / "run2")])


def test_rpf_scarce_layouts_counts_no_short_box():
    report = _load("rpf_scarce_layouts").main(["--layouts", "30"])
    assert report == {"layouts": 30, "short": 0}


def test_rpf_positives_reports_each_assignment_on_the_same_batches(tmp_path):
    _save_tiny_model(tmp_path / "model", query_mode="none")
    report = _load("rpf_positives").main(
        ["--model", str(tmp_path / "model"), "--batches", "1", "--", "--synthetic_num_train", "20",
         "--synthetic_num_val", "2", "--synthetic_cache_dir", str(tmp_path / "data"), "--image_scales", "64",
         "--max_image_size", "80", "--eval_image_size", "64", "--labeled_batch_size", "1",
         "--unlabeled_batch_size", "2", "--query_mode", "none", "--pseudo_label_threshold", "0.0",
         "--backbone", "test_resnet", "--d_model", "32", "--encoder_layers", "1", "--decoder_layers", "1",
         "--ffn_dim", "64", "--attention_heads", "2", "--num_queries", "20", "--num_denoising_queries", "0"])
    boxes = {mode: r["pseudo_boxes_per_call"] for mode, r in report.items()}
    assert set(report) == {"one_to_many", "one_to_many_top4", "rpf_separate", "rpf_joint"}
    assert len(set(boxes.values())) == 1 and boxes["one_to_many"] > 0
    assert report["one_to_many"]["duplicates_per_box"] == 0 and report["one_to_many_top4"]["duplicates_per_box"] == 0
    assert report["rpf_separate"]["positives_per_box"] <= 4 and report["rpf_joint"]["positives_per_box"] <= 4
    assert report["one_to_many_top4"]["positives_per_box"] <= report["one_to_many"]["positives_per_box"]
    assert report["rpf_joint"]["positives_per_box"] >= report["one_to_many_top4"]["positives_per_box"]


def test_pseudo_label_trace_follows_the_ema_setting(tmp_path):
    """Windows of the training steps with their mean pseudo-label count and the EMA momentum actually used."""
    _save_tiny_model(tmp_path / "model", qrm_reduced_dim=16, qrm_attention_heads=2)
    tracer = _load("pseudo_label_trace")
    common = ["--synthetic_num_train", "20", "--synthetic_num_val", "2", "--image_scales", "64", "--max_image_size",
              "80", "--eval_image_size", "64", "--labeled_batch_size", "1", "--unlabeled_batch_size", "2",
              "--model_name_or_path", str(tmp_path / "model"), "--pseudo_label_threshold", "0.0",
              "--ema_momentum", "0.9"]
    rows = tracer.main(["--steps", "3", "--window", "2", "--", *common])
    assert [row["steps"] for row in rows] == ["1-2", "3-3"]
    assert all(row["pseudo_labels_per_image"] > 0 for row in rows)  # tau 0: every image gets pseudo-labels
    assert [row["ema_momentum"] for row in rows] == [0.9, 0.9]  # a loaded model: no warm-up by default
    warm = tracer.main(["--steps", "2", "--window", "2", "--", *common, "--ema_warmup", "true"])
    assert warm[0]["ema_momentum"] == pytest.approx(1 - 1 / 3)  # the warm-up at the second update


# ---------------------------------------------------------------- benchmarks/study.py


def _write_results(run_dir: Path, history: list[tuple], test: dict | None = None) -> None:
    """A results.json with evaluations ``(step, teacher AP, student AP, pseudo-labels per image)``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = lambda ap: {"AP": ap, "AP50": 2 * ap, "AP75": ap, "APs": ap / 2}  # noqa: E731
    records = [{"step": s, "teacher": metrics(t), "student": metrics(u), "pseudo_labels_per_image": p}
               for s, t, u, p in history]
    run_dir.joinpath("results.json").write_text(json.dumps({"history": records, "test": test}))


def test_study_passthrough_and_arm_flags():
    study = _load("study")
    assert study.split_passthrough(["--seeds", "0", "--", "--max_steps", "5"]) == (["--seeds", "0"],
                                                                                   ["--max_steps", "5"])
    args = types.SimpleNamespace(output_dir="out", preset="p", labeled_percent=10.0, steps=8, eval_every=None)
    flags = study.arm_flags(args, ["--unsup_weight", "1.0", "--query_mode", "none"], "qrm_only", 2)
    # the arm's own flags come after the shared ones (argparse keeps the last value of a repeated flag)
    assert flags.index("refined") > flags.index("none") and flags[-2:] == ["--seed", "2"]
    assert flags[flags.index("--eval_steps") + 1] == "2" and "out/burnin/best_model" in flags


def test_study_rpf_arms_state_their_matching_and_the_top4_baseline_is_opt_in():
    study = _load("study")
    args = types.SimpleNamespace(output_dir="out", preset="p", labeled_percent=10.0, steps=8, eval_every=None)
    for arm in ("rpf_only", "sparse_semi_detr"):  # never the burn-in's saved matching
        flags = study.arm_flags(args, [], arm, 0)
        assert flags[flags.index("--rpf_joint_matching") + 1] == "true"
    top4 = study.arm_flags(args, [], "semi_detr_top4", 0)
    assert top4[top4.index("--one_to_many_topk") + 1] == "4" and top4[top4.index("--use_rpf") + 1] == "false"
    assert "semi_detr_top4" in study.ARMS and "semi_detr_top4" not in study.PAPER_ARMS


def test_study_runner_reuses_finished_runs_and_never_reports_stale_results(tmp_path, monkeypatch):
    study = _load("study")
    run_dir = tmp_path / "run"
    _write_results(run_dir, [(0, 0.1, 0.1, None)])

    def must_not_train(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study.subprocess, "Popen", must_not_train)
    assert study.Runner().run(str(run_dir), [])["reused"]

    class Failing:
        def __init__(self, *a, **k):
            pass

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(study.subprocess, "Popen", Failing)
    record = study.Runner(fresh=True).run(str(run_dir), [])
    assert record["returncode"] == 1 and not (run_dir / "results.json").exists()


def test_study_tables_read_finished_and_stopped_runs(tmp_path):
    """Curves at the steps every seed reached (a stopped run's log lines count), test metrics only when every
    seed has them, mean ± sample std."""
    study = _load("study")
    test = lambda ap: {"step": 20, "images": 30,  # noqa: E731
                       "teacher": {"AP": ap, "AP50": 0.5, "AP75": 0.3, "APs": 0.1},
                       "student": {"AP": ap / 2, "AP50": 0.4, "AP75": 0.2, "APs": 0.1}}
    _write_results(tmp_path / "a_seed0", [(0, 0.1, 0.1, None), (10, 0.2, 0.3, 2.0), (20, 0.3, 0.4, 1.0)], test(0.3))
    _write_results(tmp_path / "a_seed1", [(0, 0.1, 0.1, None), (10, 0.4, 0.5, 4.0), (20, 0.5, 0.6, 3.0)], test(0.5))
    stopped = tmp_path / "b_seed0"
    stopped.mkdir()
    stopped.joinpath("log.txt").write_text(
        "train: 5%|\r2026 INFO trainer: step 10: student AP 0.4000, teacher AP 0.3000\rtrain: 60%|")
    summary = study.summarize({"a": [str(tmp_path / "a_seed0"), str(tmp_path / "a_seed1")], "b": [str(stopped)]})
    a, b = summary["a"], summary["b"]
    assert list(a["curve"]) == [0, 10, 20] and list(b["curve"]) == [10]
    assert a["curve"][10]["teacher"]["mean"] == pytest.approx(30.0)
    assert a["curve"][10]["teacher"]["std"] == pytest.approx(14.142, abs=1e-3)
    assert a["curve"][10]["pseudo"]["mean"] == pytest.approx(3.0) and a["curve"][0]["pseudo"] is None
    assert a["test"]["teacher"]["AP"]["mean"] == pytest.approx(40.0) and b["test"] is None
    text = study.report(summary)
    assert "| a | 2 | 40.0 ± 14.1 |" in text and "| 10 | 30.0 ± 14.1 | 30.0 (1) |" in text
    assert "| a | 10 | 3.00 ± 1.41 | – | – |" in text  # pseudo-labels per image (no precision recorded here)
    # a run continued in a second folder: evaluations merged, the later folder wins
    more = tmp_path / "a_seed1_more"
    _write_results(more, [(20, 0.9, 0.9, None), (30, 0.7, 0.8, None)])
    merged = study.run_evaluations(f"{tmp_path / 'a_seed1'}+{more}")
    assert sorted(merged) == [0, 10, 20, 30] and merged[20]["teacher"] == 0.9


def test_study_end_to_end_burnin_arms_and_tables(tmp_path):
    """A whole (tiny) study: burn-in, calibration arm, two arms x one seed, the held-out test set, the tables."""
    from tests.test_train_script import TINY

    study = _load("study")
    out = tmp_path / "study"
    result = study.main(["--output_dir", str(out), "--preset", "synthetic", "--burnin_steps", "2", "--steps", "2",
                         "--eval_every", "1", "--seeds", "0", "--arms", "supervised,sparse_semi_detr",
                         "--calibration", "--parallel", "2", "--",
                         *TINY, "--synthetic_num_test", "4", "--synthetic_cache_dir", str(tmp_path / "cache"),
                         "--pseudo_label_threshold", "0.0", "--detection_picture_images", "0"])
    assert [r["returncode"] for r in result["records"]] == [0, 0, 0, 0]
    summary = result["summary"]
    assert set(summary) == {"burnin", "calibration_100", "supervised", "sparse_semi_detr"}
    assert list(summary["sparse_semi_detr"]["curve"]) == [0, 1, 2]  # evaluated at the start (the burn-in)
    assert list(summary["calibration_100"]["curve"])[-1] == 4  # burn-in + arm steps
    start = summary["sparse_semi_detr"]["curve"][0]["teacher"]["mean"]
    assert start == pytest.approx(summary["supervised"]["curve"][0]["teacher"]["mean"])  # the same burn-in
    assert summary["sparse_semi_detr"]["test"]["images"] == 4
    assert (out / "study.json").is_file()
    again = study.main(["--output_dir", str(out), "--preset", "synthetic", "--burnin_steps", "2", "--steps", "2",
                        "--seeds", "0", "--arms", "supervised", "--stages", "arms,table", "--", *TINY])
    assert [r["reused"] for r in again["records"]] == [True]


def test_coco_subset_keeps_the_named_images_their_boxes_and_the_categories(tmp_path):
    coco_subset = _load("coco_subset")
    coco = {"info": {"v": 1}, "categories": [{"id": 7, "name": "cell"}],
            "images": [{"id": i, "file_name": f"img_{i}.jpg"} for i in (1, 2, 3)],
            "annotations": [{"id": 10 + i, "image_id": i, "category_id": 7, "bbox": [0, 0, 4, 4]} for i in (1, 2, 2, 3)]}
    (tmp_path / "all.json").write_text(json.dumps(coco))
    (tmp_path / "split.txt").write_text("img_3\n\nimg_2\n")
    coco_subset.main(["--annotations", str(tmp_path / "all.json"), "--stems", str(tmp_path / "split.txt"),
                      "--output", str(tmp_path / "out" / "split.json")])
    subset = json.loads((tmp_path / "out" / "split.json").read_text())
    assert [image["id"] for image in subset["images"]] == [2, 3]
    assert sorted(a["image_id"] for a in subset["annotations"]) == [2, 2, 3]
    assert subset["categories"] == coco["categories"] and subset["info"] == coco["info"]
    with pytest.raises(ValueError, match="name no image"):
        coco_subset.coco_subset(coco, ["img_1", "img_9"])


def test_compile_bisect_compares_each_variant_to_eager_of_its_attention_path(tmp_path):
    bisect = _load("compile_bisect")
    output = tmp_path / "bisect.json"
    results = bisect.main(["--preset", "cpu_smoke", "--device", "cpu", "--variants",
                           "whole/aot_eager/pytorch,whole/inductor/triton/no_padding", "--output", str(output)])
    assert json.loads(output.read_text()) == results
    traced, triton = results["variants"]
    assert traced["difference_to_eager"]["memory"] == 0.0 and traced["difference_to_eager"]["logits"] == 0.0
    assert traced["difference_to_eager"]["boxes_in_unit_range"] and "error" not in traced
    assert traced["frames_compiled"] > 0  # something was compiled: an uncompiled model would also equal eager
    assert triton["inductor_settings"] == {"comprehensive_padding": False} and "skipped" in triton
    with pytest.raises(ValueError, match="part/backend/attention"):
        bisect.parse_variant("whole/inductor")


def test_compile_bisect_flags_boxes_a_sigmoid_cannot_give():
    bisect = _load("compile_bisect")
    import torch

    reference = types.SimpleNamespace(logits=torch.zeros(1, 3, 2), pred_boxes=torch.full((1, 3, 4), 0.5),
                                      encoder_last_hidden_state=torch.zeros(1, 5, 4))
    wrong = types.SimpleNamespace(logits=torch.zeros(1, 3, 2), pred_boxes=reference.pred_boxes.clone(),
                                  encoder_last_hidden_state=torch.ones(1, 5, 4))
    wrong.pred_boxes[0, 1, 2] = 6.5
    difference = bisect.compare(wrong, reference)
    assert not difference["boxes_in_unit_range"] and difference["pred_boxes_min_max"] == [0.5, 6.5]
    assert difference["pred_boxes"] == 6.0 and difference["memory"] == 1.0 and difference["sorted_scores"] == 0.0
    assert bisect.compare(reference, reference)["boxes_in_unit_range"]
