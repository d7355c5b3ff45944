import json
import logging
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from sparse_semi_detr_hf.training.hub import HubUploader, build_model_card

EVAL = {"AP": 0.412, "AP50": 0.613, "AP75": 0.447, "APs": -1.0, "APm": 0.35, "APl": 0.52}
MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "configuration_sparse_semi_detr.py",
    "modeling_sparse_semi_detr.py",
    "box_ops.py",
    "README.md",
}


class FakeHubApi:
    """Records calls; "uploads" by copying the folder (with huggingface_hub's own ignore filtering) to a local remote.

    ``fail`` is a list consumed one entry per upload: ``"raise"`` raises at submission, ``"future"`` returns a
    future that finished with an error, ``None`` succeeds. ``fail_create`` makes ``create_repo`` raise.
    """

    def __init__(self, remote: Path, fail=(), fail_create=False):
        self.remote = remote
        self.fail = list(fail)
        self.fail_create = fail_create
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail_create:
            raise ConnectionError("hub down")
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        mode = self.fail.pop(0) if self.fail else None
        if mode == "raise":
            raise ConnectionError("upload refused")
        future: Future = Future()
        if mode == "future":
            future.set_exception(TimeoutError("upload timed out"))
            return future
        folder = Path(kwargs["folder_path"])
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        target = self.remote / kwargs["repo_id"]
        for name in filter_repo_objects(files, ignore_patterns=kwargs.get("ignore_patterns")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, target / name)
        future.set_result(SimpleNamespace(commit_message=kwargs["commit_message"]))
        return future

    def calls_to(self, kind):
        return [kwargs for name, kwargs in self.calls if name == kind]


def _model_folder(root: Path, step: int = 0) -> Path:
    folder = root / "output"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "sparse_semi_detr", "step": step}))
    (folder / "model.safetensors").write_bytes(b"weights" + bytes([step]))
    (folder / "preprocessor_config.json").write_text("{}")
    for name in ("configuration_sparse_semi_detr.py", "modeling_sparse_semi_detr.py", "box_ops.py"):
        (folder / name).write_text("# model code\n")
    card = build_model_card("user/ssdetr", EVAL, "bccd", 10, {"lr": 1e-4, "step": step}, dataset_id="user/bccd")
    card.save(folder / "README.md")
    # Training state that must stay local.
    checkpoint = folder / "checkpoints" / "checkpoint_0"
    checkpoint.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_0.pkl"):
        (checkpoint / name).write_bytes(b"state")
    (folder / "optimizer.bin").write_bytes(b"state")
    (folder / "teacher.pt").write_bytes(b"state")
    return folder


def _remote_files(remote: Path, repo_id: str) -> set[str]:
    return {p.relative_to(remote / repo_id).as_posix() for p in (remote / repo_id).rglob("*") if p.is_file()}


def test_push_uploads_model_files_only(tmp_path):
    api = FakeHubApi(tmp_path / "remote")
    uploader = HubUploader("user/ssdetr", api=api)
    folder = _model_folder(tmp_path)
    future = uploader.push(folder, commit_message="step 100")
    assert future.result(timeout=30) is not None  # the job ran on the uploader's own thread
    assert uploader.finish() is True
    assert _remote_files(tmp_path / "remote", "user/ssdetr") == MODEL_FILES
    (create,) = api.calls_to("create_repo")
    assert create["exist_ok"] is True and create["private"] is False
    (upload,) = api.calls_to("upload_folder")
    assert upload["run_as_future"] is False  # blocking, on the uploader's daemon thread
    assert upload["commit_message"] == "step 100"
    # a hard-linked snapshot of the folder taken at push time is uploaded, then removed
    assert Path(upload["folder_path"]).name.startswith(".hub-upload-output-")
    assert not Path(upload["folder_path"]).exists()
    uploader.push(folder, commit_message="step 200")
    assert uploader.wait(timeout=30)
    assert len(api.calls_to("create_repo")) == 1  # created lazily, once
    assert len(api.calls_to("upload_folder")) == 2


def test_repo_id_from_create_repo_is_used(tmp_path):
    api = FakeHubApi(tmp_path / "remote")
    uploader = HubUploader("ssdetr", api=api, private=True)
    uploader.push(_model_folder(tmp_path), "first")
    assert uploader.wait(timeout=30)
    assert api.calls_to("create_repo")[0]["private"] is True
    assert api.calls_to("upload_folder")[0]["repo_id"] == "user/ssdetr"
    assert uploader.finish()


def test_model_card_round_trip(tmp_path):
    api = FakeHubApi(tmp_path / "remote")
    uploader = HubUploader("user/ssdetr", api=api)
    uploader.push(_model_folder(tmp_path), "card")
    assert uploader.finish()
    card = ModelCard.load(tmp_path / "remote" / "user/ssdetr" / "README.md")
    assert card.data.pipeline_tag == "object-detection"
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["user/bccd"]
    assert "semi-supervised" in card.data.tags
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"AP", "AP50", "AP75", "APm", "APl"}  # APs = -1 (not computed) is left out
    for name, result in results.items():
        assert result.metric_value == pytest.approx(EVAL[name])
        assert result.task_type == "object-detection"
        assert result.dataset_name == "bccd"
    assert results["AP"].metric_type == "map" and results["AP50"].metric_type == "map_50"
    text = card.text
    assert "[More Information Needed]" not in text
    assert "trust_remote_code=True" in text and 'pipeline("object-detection"' in text
    assert "post_process_object_detection" in text
    assert "2404.01819" in text and "Shehzadi" in text and "@inproceedings" in text
    assert "| APs | n/a |" in text and "| AP | 0.412 |" in text
    assert "| lr | 0.0001 |" in text and "10 %" in text


def test_model_card_without_results():
    card = build_model_card("user/ssdetr", {}, "coco", 1, {}, base_model="user/dino-r50")
    assert card.data.eval_results is None
    assert card.data.datasets is None  # a local dataset's name is not a Hub id: no `datasets:` metadata
    assert card.data.base_model == "user/dino-r50"
    assert "No evaluation results" in card.text


@pytest.mark.parametrize("mode", ["raise", "future"])
def test_failed_upload_is_logged_and_retried_with_latest_state(tmp_path, caplog, mode):
    api = FakeHubApi(tmp_path / "remote", fail=[mode])
    uploader = HubUploader("user/ssdetr", api=api)
    with caplog.at_level(logging.WARNING, logger="sparse_semi_detr_hf.training.hub"):
        uploader.push(_model_folder(tmp_path, step=1), "step 1")  # fails; must not raise
        assert uploader.wait(timeout=30) and uploader.needs_retry
    assert any("upload for user/ssdetr failed" in r.getMessage() for r in caplog.records)
    assert len(uploader.errors) == 1
    assert not (tmp_path / "remote" / "user/ssdetr").exists()

    uploader.push(_model_folder(tmp_path, step=2), "step 2")  # the retry: the newest state goes up
    assert uploader.finish() is True
    assert not uploader.needs_retry
    config = json.loads((tmp_path / "remote" / "user/ssdetr" / "config.json").read_text())
    assert config["step"] == 2
    assert [c["commit_message"] for c in api.calls_to("upload_folder")] == ["step 1", "step 2"]


def test_finish_retries_failed_final_upload(tmp_path):
    api = FakeHubApi(tmp_path / "remote", fail=["future", "raise"])
    uploader = HubUploader("user/ssdetr", api=api, max_retries=2)
    uploader.push(_model_folder(tmp_path), "final")
    assert uploader.finish() is True  # third attempt succeeds
    assert len(api.calls_to("upload_folder")) == 3
    assert _remote_files(tmp_path / "remote", "user/ssdetr") == MODEL_FILES


def test_finish_reports_failure(tmp_path, caplog):
    api = FakeHubApi(tmp_path / "remote", fail=["future"] * 10)
    uploader = HubUploader("user/ssdetr", api=api, max_retries=2)
    uploader.push(_model_folder(tmp_path), "final")
    with caplog.at_level(logging.ERROR, logger="sparse_semi_detr_hf.training.hub"):
        assert uploader.finish() is False
    assert len(api.calls_to("upload_folder")) == 3  # the push + 2 retries
    assert any("Pushing to user/ssdetr failed" in r.getMessage() for r in caplog.records)


def test_create_repo_failure_is_logged_and_retried(tmp_path):
    api = FakeHubApi(tmp_path / "remote", fail_create=True)
    uploader = HubUploader("user/ssdetr", api=api)
    uploader.push(_model_folder(tmp_path), "one")  # repo may exist already: the upload is still tried
    assert uploader.wait(timeout=30)
    assert len(api.calls_to("upload_folder")) == 1
    assert any("create_repo" in e for e in uploader.errors)
    api.fail_create = False
    uploader.push(_model_folder(tmp_path), "two")
    assert uploader.wait(timeout=30)
    assert len(api.calls_to("create_repo")) == 2
    assert uploader.finish()


def test_finish_times_out_on_hanging_upload(tmp_path):
    class HangingApi(FakeHubApi):
        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs))
            return Future()  # never completes

    uploader = HubUploader("user/ssdetr", api=HangingApi(tmp_path / "remote"))
    started = time.monotonic()
    uploader.push(_model_folder(tmp_path), "slow")
    assert time.monotonic() - started < 1.0  # push never waits for the Hub
    assert uploader.finish(timeout=0.05) is False and "still running" in uploader.errors[-1]


def test_a_hub_that_never_answers_delays_nothing(tmp_path):
    """A real ``HfApi`` against a loopback server that accepts connections and never answers: push returns at
    once, finish returns after its timeout, and the hung request lives on a daemon thread."""
    import socket
    import threading

    from huggingface_hub import HfApi

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(8)], daemon=True).start()
    api = HfApi(endpoint=f"http://127.0.0.1:{server.getsockname()[1]}", token="hf_" + "x" * 34)
    uploader = HubUploader("user/ssdetr", api=api, max_retries=0)
    started = time.monotonic()
    uploader.push(_model_folder(tmp_path), "never answered")
    assert time.monotonic() - started < 1.0
    assert uploader.finish(timeout=2.0) is False
    assert time.monotonic() - started < 5.0
    assert uploader._worker._thread.daemon


def test_finish_without_push_is_success(tmp_path):
    api = FakeHubApi(tmp_path / "remote")
    assert HubUploader("user/ssdetr", api=api).finish() is True
    assert api.calls == []


def test_offline_real_hfapi_fails_gracefully(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    uploader = HubUploader("user/ssdetr", token="hf_not_a_real_token", max_retries=1)
    assert isinstance(uploader.api, HfApi)
    uploader.push(_model_folder(tmp_path), "offline")
    assert uploader.finish(timeout=60) is False
    assert uploader.errors and all("OfflineModeIsEnabled" in e for e in uploader.errors)


def test_an_upload_sends_the_folder_as_it_was_when_pushed(tmp_path):
    """The next export replaces the folder while the previous upload is still running: the upload is unaffected."""
    import threading

    from sparse_semi_detr_hf.training.checkpoints import replace_folder

    release = threading.Event()

    class SlowApi(FakeHubApi):
        def upload_folder(self, **kwargs):
            release.wait(30)
            return super().upload_folder(**kwargs)

    api = SlowApi(tmp_path / "remote")
    uploader = HubUploader("user/ssdetr", api=api)
    folder = _model_folder(tmp_path, step=1)
    uploader.push(folder, "step 1")
    newer = tmp_path / "newer"
    shutil.copytree(folder, newer)
    (newer / "config.json").write_text(json.dumps({"model_type": "sparse_semi_detr", "step": 2}))
    replace_folder(str(newer), str(folder))
    release.set()
    assert uploader.finish(timeout=30)
    assert json.loads((tmp_path / "remote" / "user/ssdetr" / "config.json").read_text())["step"] == 1
