"""No credential reaches what a run writes: the redaction rules, the settings dicts built from them, and a whole
training run with a token on the command line and in ``HF_TOKEN`` whose every output file is searched."""

import importlib.util
import logging
from pathlib import Path

from sparse_semi_detr_hf.training.arguments import TrainingArguments
from sparse_semi_detr_hf.training.hub import HubUploader
from sparse_semi_detr_hf.training.secrets import (
    MASK,
    looks_like_local_path,
    public_settings,
    redact,
    redact_settings,
    redact_text,
)

REPO = Path(__file__).resolve().parents[1]
CLI_TOKEN = "hf_CommandLineSecret0123456789abcdef"
ENV_TOKEN = "hf_EnvironmentSecret0123456789abcdef"


def test_urls_lose_their_credentials():
    assert redact_text("https://alice:pa55@example.com/data") == f"https://{MASK}@example.com/data"
    assert redact_text("s3://bucket/x?X-Amz-Signature=abc&v=1") == f"s3://bucket/x?X-Amz-Signature={MASK}&v=1"
    assert redact_text("https://h/x?access_token=abc#frag") == f"https://h/x?access_token={MASK}#frag"
    assert redact_text("https://huggingface.co/user/model") == "https://huggingface.co/user/model"


def test_token_shaped_and_known_values_are_masked():
    assert redact_text(f"key {CLI_TOKEN} end") == f"key {MASK} end"
    assert redact_text("my-short-secret in text", ["my-short-secret"]) == f"{MASK} in text"
    assert redact({"a": ["x hf_AAAAAAAAAAAAAAAAAAAAAAAAAA", 3]}) == {"a": [f"x {MASK}", 3]}


def test_secret_named_settings_become_placeholders(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    settings = redact_settings({"hub_token": CLI_TOKEN, "wandb_api_key": None, "note": f"uses {ENV_TOKEN}",
                                "url": f"https://u:{CLI_TOKEN}@host", "lr": 1e-4})
    assert settings == {"hub_token": "<HUB_TOKEN>", "wandb_api_key": None, "note": f"uses {MASK}",
                        "url": f"https://{MASK}@host", "lr": 1e-4}
    # a secret-named setting's value is masked wherever else it appears
    assert redact_settings({"password": "correct horse", "comment": "correct horse"})["comment"] == MASK


def test_public_settings_drop_paths_and_secrets(tmp_path):
    (tmp_path / "sub").mkdir()
    settings = {"output_dir": "runs/x", "images": str(tmp_path), "home": "~/data", "rel": "./x",
                "existing": str(tmp_path / "sub"), "hub_model_id": "user/name", "hub_token": CLI_TOKEN,
                "backbone": "resnet50", "unset": None, "lr": 1e-4}
    assert public_settings(settings, path_names=["output_dir"]) == {"hub_model_id": "user/name",
                                                                    "backbone": "resnet50", "lr": 1e-4}
    assert looks_like_local_path("C:\\data") and not looks_like_local_path("facebook/detr-resnet-50")


def test_training_arguments_never_expose_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    args = TrainingArguments(output_dir=str(tmp_path), hub_token=CLI_TOKEN, model_name_or_path="user/base",
                             train_images=str(tmp_path), train_annotations=str(tmp_path / "a.json"),
                             dataset_name=None, preset="synthetic")
    assert args.to_dict()["hub_token"] == "<HUB_TOKEN>" and args.to_dict()["output_dir"] == str(tmp_path)
    public = args.public_dict()
    assert "hub_token" not in public and "output_dir" not in public and "train_images" not in public
    assert public["model_name_or_path"] == "user/base" and public["max_steps"] == args.max_steps
    assert CLI_TOKEN not in repr(public) + repr(args.to_dict())


def test_uploader_errors_do_not_carry_the_token():
    class LeakyApi:
        def create_repo(self, **kwargs):
            raise RuntimeError(f"401 for Authorization: Bearer {CLI_TOKEN}")

        def upload_folder(self, **kwargs):
            raise RuntimeError(f"token {CLI_TOKEN} refused")

    uploader = HubUploader("user/repo", token=CLI_TOKEN, api=LeakyApi())
    uploader.push("folder")
    assert uploader.wait(timeout=30) and uploader.needs_retry
    assert uploader.errors and not any(CLI_TOKEN in error for error in uploader.errors)


def _load_script():
    spec = importlib.util.spec_from_file_location("train_ssod", REPO / "examples" / "train_ssod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_writes_no_token_anywhere(tmp_path, monkeypatch, caplog, capfd):
    """A token on the command line and one in ``HF_TOKEN``, ``--push_to_hub`` (offline: the upload fails and is
    recorded), TensorBoard, checkpoints, the exported model and its card: no file and no log line holds either
    token, and the card names no local path."""
    from tests.test_train_script import TINY

    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    output = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        results = _load_script().main([
            *TINY, "--output_dir", str(output), "--max_steps", "2", "--one_to_many_steps", "1", "--eval_steps", "2",
            "--checkpointing_steps", "1", "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id",
            "user/leak-test", "--hub_token", CLI_TOKEN, "--synthetic_cache_dir", str(tmp_path / "cache"),
        ])
    assert results["hub_upload_ok"] is False and results["hub_errors"]  # offline: recorded, not fatal
    written = [path for path in output.rglob("*") if path.is_file()]
    kinds = {path.name for path in written}
    assert {"results.json", "README.md", "model.safetensors", "optimizer.bin", "hparams.yml"} <= kinds
    assert any(name.startswith("events.out.tfevents") for name in kinds)
    assert any(name.endswith(".pkl") for name in kinds)  # the teacher and training state of a checkpoint
    captured = capfd.readouterr()
    for secret in (CLI_TOKEN, ENV_TOKEN):
        leaks = [str(path) for path in written if secret.encode() in path.read_bytes()]
        assert leaks == [], f"token written to {leaks}"
        assert secret not in caplog.text + captured.out + captured.err
    card = (output / "best_model" / "README.md").read_text()
    assert "<HUB_TOKEN>" not in card and "hub_token" not in card
    assert str(tmp_path) not in card and "output_dir" not in card
