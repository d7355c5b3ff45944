"""Pushing the trained model to the Hugging Face Hub: a fault-tolerant background uploader and the model card.

Nothing here may stop training: every Hub error is logged and remembered, never raised. See docs/hub.md.
"""

import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .secrets import known_secrets, redact_text

logger = logging.getLogger(__name__)

# Checkpoints (``checkpoints/checkpoint-<step>``: optimizer.bin, scheduler.bin, random_states_*.pkl,
# custom_checkpoint_*.pkl with the teacher), pickles and other raw torch dumps stay local. The model itself is
# ``model.safetensors``. Patterns use huggingface_hub's fnmatch rules, where ``*`` also matches ``/``.
DEFAULT_IGNORE_PATTERNS = (
    "checkpoint*",
    "*/checkpoint*",
    "*.pkl",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.lock",
)


def _snapshot(folder: str) -> str | None:
    """A copy of ``folder`` made of hard links (instant, no data copied; real copies where links are refused), next
    to it; None when ``folder`` is not a directory (the upload then reports the error)."""
    if not os.path.isdir(folder):
        return None
    parent = os.path.dirname(os.path.abspath(folder))
    snapshot = tempfile.mkdtemp(prefix=f".hub-upload-{os.path.basename(os.path.normpath(folder))}-", dir=parent)
    for root, _, files in os.walk(folder):
        target = os.path.join(snapshot, os.path.relpath(root, folder))
        os.makedirs(target, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(root, name), os.path.join(target, name))
            except OSError:
                shutil.copy2(os.path.join(root, name), os.path.join(target, name))
    return snapshot


class _DaemonWorker:
    """Runs submitted calls one at a time, in order, on one daemon thread: a call that never returns (a Hub
    endpoint that accepts the connection and never answers) blocks neither training nor the process's exit."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hub-upload", daemon=True)
            self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # noqa: BLE001 - handed to the future's owner
                future.set_exception(error)


class HubUploader:
    """Uploads an output folder to a Hub model repository in the background, surviving every failure.

    Args:
        repo_id: ``"namespace/name"`` (or ``"name"`` for the token's user namespace).
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the ``huggingface-cli login`` token.
        private: create the repository as private.
        api: an ``HfApi``-like client (``create_repo`` and ``upload_folder``); injectable for tests.
        max_retries: how many times :meth:`finish` re-submits the latest folder when its upload failed.
        ignore_patterns: files never uploaded (default :data:`DEFAULT_IGNORE_PATTERNS`).

    Each :meth:`push` queues one job on the uploader's own daemon thread: ``create_repo(exist_ok=True)`` until it
    has succeeded once, then ``upload_folder``; jobs run one at a time in submission order, and nothing Hub-related
    runs on the calling (training) thread. A failed job is logged and remembered; the next :meth:`push`
    re-uploads the newest folder, which is the retry (the latest state is what matters). :meth:`finish` waits for
    pending uploads (with a timeout) and reports success.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        api: Any = None,
        max_retries: int = 2,
        ignore_patterns: tuple[str, ...] | list[str] = DEFAULT_IGNORE_PATTERNS,
    ):
        self.repo_id = repo_id
        self.private = private
        self.max_retries = max(0, int(max_retries))
        self.ignore_patterns = list(ignore_patterns)
        self.api = api if api is not None else HfApi(token=token)
        self._secrets = known_secrets([token])
        self.errors: list[str] = []
        self._repo_ready = False
        self._pending: list[Future] = []
        self._latest: tuple[str, str] | None = None
        self._latest_failed = False
        self._worker = _DaemonWorker()

    @property
    def needs_retry(self) -> bool:
        """True when the most recent finished upload failed and no later one has succeeded yet."""
        self._collect()
        return self._latest_failed

    def _ensure_repo(self) -> None:
        """Create the repository once (``exist_ok=True``); a failure is logged and tried again next push (the
        upload is attempted anyway: the repository may exist). Runs on the worker thread."""
        if self._repo_ready:
            return
        try:
            url = self.api.create_repo(repo_id=self.repo_id, private=self.private, exist_ok=True)
        except Exception as error:  # noqa: BLE001 - the Hub must never stop training
            self._record_failure("create_repo", error)
            return
        self.repo_id = getattr(url, "repo_id", None) or self.repo_id
        self._repo_ready = True

    def _upload(self, folder: str, commit_message: str, snapshot: str | None = None):
        """The worker thread's job: the repository, then the folder (blocking); ``snapshot`` (a hard-linked copy
        taken at push time, so a later export that replaces ``folder`` cannot change what is being uploaded) is
        uploaded instead and removed afterwards."""
        try:
            self._ensure_repo()
            result = self.api.upload_folder(repo_id=self.repo_id, folder_path=snapshot or folder,
                                            commit_message=commit_message, ignore_patterns=self.ignore_patterns,
                                            run_as_future=False)
            return result.result() if isinstance(result, Future) else result
        finally:
            if snapshot is not None:
                shutil.rmtree(snapshot, ignore_errors=True)

    def _record_failure(self, what: str, error: BaseException) -> None:
        message = redact_text(f"{what} for {self.repo_id} failed: {type(error).__name__}: {error}", self._secrets)
        logger.warning("Hub %s (training continues; the latest folder is pushed again next time)", message)
        self.errors.append(message)

    def _collect(self) -> None:
        """Harvest finished futures in submission order; the last one decides whether a retry is needed."""
        still_pending = []
        for future in self._pending:
            if not future.done():
                still_pending.append(future)
                continue
            error = future.exception()
            if error is not None:
                self._record_failure("upload", error)
            self._latest_failed = error is not None
        self._pending = still_pending

    def push(self, folder: str, commit_message: str = "Upload model") -> Future:
        """Queue the upload of ``folder`` (repository creation included) on the worker thread; never raises,
        never waits for the Hub. Returns the job's future."""
        self._collect()
        if self._latest_failed:
            logger.info("Retrying the failed Hub upload with the latest state in %s", folder)
        self._latest = (str(folder), commit_message)
        future = self._worker.submit(self._upload, str(folder), commit_message, _snapshot(str(folder)))
        self._pending.append(future)
        return future

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the queued uploads, at most ``timeout`` seconds; True when all finished."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        return self._wait(deadline)

    def _wait(self, deadline: float) -> bool:
        """Wait for pending futures until ``deadline`` (``time.monotonic``); True when all finished."""
        remaining = None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())
        _, not_done = wait_futures(self._pending, timeout=remaining)
        self._collect()
        return not not_done

    def finish(self, timeout: float | None = None) -> bool:
        """Wait for pending uploads (at most ``timeout`` seconds in all), retry a failed final one up to
        ``max_retries`` times, and return True when the latest folder is on the Hub. Never raises; after the
        timeout a hung upload is left behind on its daemon thread (it does not keep the process alive)."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        try:
            if not self._wait(deadline):
                message = f"upload to {self.repo_id} still running after {timeout} s (the endpoint does not answer)"
                logger.warning("Hub %s", message)
                self.errors.append(message)
                return False
            for attempt in range(self.max_retries):
                if not self._latest_failed or self._latest is None or time.monotonic() >= deadline:
                    break
                logger.info("Hub upload retry %d/%d for %s", attempt + 1, self.max_retries, self.repo_id)
                self.push(*self._latest)
                if not self._wait(deadline):
                    return False
        except Exception as error:  # noqa: BLE001 - the Hub must never stop training
            self._record_failure("finish", error)
            return False
        success = not self._latest_failed
        if success and self._latest is not None:
            logger.info("Model pushed to https://huggingface.co/%s", self.repo_id)
        elif not success:
            logger.error("Pushing to %s failed: %s", self.repo_id, self.errors[-1] if self.errors else "unknown")
        return success


_METRIC_TYPES = {
    "AP": "map",
    "AP50": "map_50",
    "AP75": "map_75",
    "APs": "map_small",
    "APm": "map_medium",
    "APl": "map_large",
}

_MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

**Sparse Semi-DETR** is a semi-supervised, end-to-end object detector: a DINO detector (4-scale deformable
DETR with contrastive denoising and mixed query selection) trained teacher–student on a few labeled and many
unlabeled images. On top of Semi-DETR's stage-wise hybrid matching (one-to-many, then one-to-one) it adds a
**Query Refinement Module**, which builds a small, refined set of object queries from the teacher's RoI
features of pseudo-boxes (low- and high-resolution feature maps, attention plus a similarity step), and
**Reliable Pseudo-Label Filtering**, which keeps the top-k predictions per augmented pseudo-label group and
filters duplicate pseudo-labels. Inference needs no NMS and no custom CUDA op.

This checkpoint was trained with `sparse_semi_detr_hf`, a Hugging Face-native implementation
(`transformers` remote code, `accelerate` trainer).

## Training

- Dataset: **{{ dataset_name }}**, with **{{ labeled_percent }} %** of the training images labeled and the rest
  used as unlabeled data.
- Teacher: exponential moving average of the student; pseudo-labels from the teacher on the weakly augmented
  view, trained on by the student on the strongly augmented view.
{%- if base_model %}
- Initialised from [`{{ base_model }}`](https://huggingface.co/{{ base_model }}).
{%- endif %}
{%- if hyperparameter_rows %}

| hyperparameter | value |
|---|---|
{%- for name, value in hyperparameter_rows %}
| {{ name }} | {{ value }} |
{%- endfor %}
{%- endif %}

## Results
{% if result_rows %}
COCO-style box metrics on the {{ dataset_name }} evaluation split (pycocotools).

| metric | value |
|---|---|
{%- for name, value in result_rows %}
| {{ name }} | {{ value }} |
{%- endfor %}
{% else %}
No evaluation results were recorded for this checkpoint.
{% endif %}
## Usage

The model code ships with the checkpoint, so load it with `trust_remote_code=True`.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection

processor = AutoImageProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)
model = AutoModelForObjectDetection.from_pretrained("{{ repo_id }}", trust_remote_code=True).eval()

image = Image.open("image.jpg").convert("RGB")
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
result = processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=[image.size[::-1]])[0]
for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
    print(model.config.id2label[label.item()], round(score.item(), 3), [round(v, 1) for v in box.tolist()])
```

With the pipeline:

```python
from transformers import pipeline

detector = pipeline("object-detection", model="{{ repo_id }}", trust_remote_code=True)
print(detector("image.jpg", threshold=0.3))
```

## Citation

```bibtex
@inproceedings{shehzadi2024sparsesemidetr,
  title     = {Sparse Semi-DETR: Sparse Learnable Queries for Semi-Supervised Object Detection},
  author    = {Shehzadi, Tahira and Hashmi, Khurram Azeem and Stricker, Didier and Afzal, Muhammad Zeshan},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024},
  eprint    = {2404.01819},
  archivePrefix = {arXiv}
}
```

It builds on:

```bibtex
@inproceedings{zhang2023semidetr,
  title     = {Semi-DETR: Semi-Supervised Object Detection with Detection Transformers},
  author    = {Zhang, Jiacheng and Lin, Xiangru and Zhang, Wei and Wang, Kai and Tan, Xiao and Han, Junyu and
               Ding, Errui and Wang, Jingdong and Li, Guanbin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023},
  eprint    = {2307.08095},
  archivePrefix = {arXiv}
}

@inproceedings{zhang2023dino,
  title     = {DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End Object Detection},
  author    = {Zhang, Hao and Li, Feng and Liu, Shilong and Zhang, Lei and Su, Hang and Zhu, Jun and Ni, Lionel M.
               and Shum, Heung-Yeung},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023},
  eprint    = {2203.03605},
  archivePrefix = {arXiv}
}
```
"""


def _is_reported(value: Any) -> bool:
    """pycocotools reports -1 for a metric without ground truth (e.g. no small objects); NaN/None are missing."""
    return value is not None and math.isfinite(float(value)) and float(value) >= 0


def _table_cell(value: Any) -> str:
    """Format a value for a markdown table cell (floats to 4 significant digits, pipes escaped)."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def build_model_card(
    repo_id: str,
    eval_results: dict[str, float],
    dataset_name: str,
    labeled_percent: float,
    hyperparameters: dict[str, Any],
    base_model: str | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub metadata key
    dataset_id: str | None = None,
    dataset_split: str | None = None,
) -> ModelCard:
    """Model card of a trained Sparse Semi-DETR: YAML metadata with a ``model-index`` and a clean README body.

    Args:
        repo_id: the Hub repository (used in the usage snippet and as the model name).
        eval_results: COCO metrics as reported by the evaluation, keys among ``AP, AP50, AP75, APs, APm, APl``
            (other keys are kept with ``metric_type = key.lower()``); values as given (pycocotools gives
            fractions in [0, 1]); negative, NaN or None values (not computed) are left out of the ``model-index``
            and shown as ``n/a``.
        dataset_name: human-readable dataset name (a local folder's name, ``synthetic``, or a Hub id).
        dataset_id: the Hub dataset id, listed in the card's ``datasets`` metadata; ``None`` (local or synthetic
            data) leaves ``datasets`` out, so the metadata never names something that is not on the Hub.
        labeled_percent: share of labeled training images, in percent.
        hyperparameters: rendered as a two-column table.
        base_model: Hub id of the initial weights, if any.

    Save with ``card.save(os.path.join(model_folder, "README.md"))``.
    """
    results = []
    for key, value in eval_results.items():
        if not _is_reported(value):
            continue
        results.append(
            EvalResult(
                task_type="object-detection",
                dataset_type=dataset_id or dataset_name,
                dataset_name=dataset_name,
                dataset_split=dataset_split,
                metric_type=_METRIC_TYPES.get(key, key.lower()),
                metric_name=key,
                metric_value=float(value),
            )
        )
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        pipeline_tag="object-detection",
        library_name="transformers",
        license=license,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        tags=["object-detection", "vision", "detr", "dino", "semi-supervised", "sparse-semi-detr", "custom_code"],
        eval_results=results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=_MODEL_CARD_TEMPLATE,
        repo_id=repo_id,
        model_name=model_name,
        dataset_name=dataset_name,
        labeled_percent=f"{labeled_percent:g}",
        base_model=base_model,
        hyperparameter_rows=[(_table_cell(k), _table_cell(v)) for k, v in hyperparameters.items()],
        result_rows=[
            (_table_cell(k), _table_cell(float(v)) if _is_reported(v) else "n/a") for k, v in eval_results.items()
        ],
    )
