"""``--stream_unlabeled``: the unlabeled set as an endless, seeded ``datasets`` stream split across processes and
DataLoader workers; the batch layout, disjoint ranks, new shuffles per pass, exact resume, and short trainer runs.

Loader tests stream 16 tiny PNGs from a folder (the ``--unlabeled_images FOLDER`` path); trainer runs use the tiny
detector of tests/test_trainer.py on 20 synthetic images.
"""

from itertools import chain
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Dataset
from test_trainer import TINY, parse

from sparse_semi_detr_hf.training import trainer as trainer_module
from sparse_semi_detr_hf.training.data import as_streaming
from sparse_semi_detr_hf.training.sampling import ResumableStream, SkipBatches
from sparse_semi_detr_hf.training.trainer import SemiSupervisedTrainer, unlabeled_stream_loader
from sparse_semi_detr_hf.training.transforms import UnlabeledPairTransform, ViewConfig

NUM_IMAGES, BATCH = 16, 2
TRANSFORM = UnlabeledPairTransform(ViewConfig(scales=(16, 20), max_size=32))
CONTRACT_KEYS = {"weak_pixel_values", "weak_pixel_mask", "strong_pixel_values", "strong_pixel_mask",
                 "weak_to_strong", "weak_sizes", "strong_sizes", "orig_sizes", "image_ids"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """16 PNGs of different sizes in two sub-folders; their image ids are 0..15 (sorted path order)."""
    folder = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        path = folder / f"part{i % 2}" / f"{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (20 + i, 28, 3), dtype=np.uint8)).save(path)
    return folder


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


def stream_batches(source, rank: int, world_size: int, batches: int, start_batch: int = 0, workers: int = 0):
    """The first ``batches`` batches of a streaming loader."""
    loader = unlabeled_stream_loader(source, TRANSFORM, BATCH, seed=3, rank=rank, world_size=world_size,
                                     start_batch=start_batch, num_workers=workers)
    iterator = iter(loader)
    return [next(iterator) for _ in range(batches)]


def stream_ids(*args, **kwargs) -> list[list[int]]:
    """``image_ids`` of :func:`stream_batches`, one list per batch."""
    return [batch["image_ids"].tolist() for batch in stream_batches(*args, **kwargs)]


def tiny_stream_args(output_dir, cache: str, *extra: str):
    return parse(*TINY, "--synthetic_cache_dir", cache, "--output_dir", str(output_dir), "--stream_unlabeled",
                 "--eval_steps", "100", *extra)


# ---------------------------------------------------------------------------------------------- loader
def test_trainer_streams_batches_in_the_data_contract(tmp_path, synthetic_cache):
    trainer = SemiSupervisedTrainer(tiny_stream_args(tmp_path, synthetic_cache))
    _, loader = trainer._loaders()
    assert isinstance(loader, SkipBatches) and isinstance(loader.loader.dataset, ResumableStream)
    unlabeled_ids = set(trainer.data.unlabeled["image_id"])
    iterator = iter(loader)
    for _ in range(3):
        batch = next(iterator)
        assert CONTRACT_KEYS | {"gt_labels"} == batch.keys()  # the split keeps hidden annotations
        for view in ("weak", "strong"):
            values, mask, sizes = (batch[f"{view}_pixel_values"], batch[f"{view}_pixel_mask"],
                                   batch[f"{view}_sizes"])
            assert values.dtype == torch.float32 and values.shape[:2] == (BATCH, 3)
            assert mask.shape == (BATCH, *values.shape[-2:]) and sizes.shape == (BATCH, 2)
            torch.testing.assert_close(mask.sum((1, 2)), sizes.prod(1))  # real pixels = unpadded view size
        assert batch["weak_to_strong"].shape == (BATCH, 3, 3) and batch["weak_to_strong"].dtype == torch.float32
        assert batch["image_ids"].shape == (BATCH,) and set(batch["image_ids"].tolist()) <= unlabeled_ids
        assert len(batch["gt_labels"]) == BATCH


def test_unlabeled_folder_is_streamed_without_a_dataset_first(tmp_path, synthetic_cache, image_folder,
                                                              monkeypatch):
    """``--unlabeled_images FOLDER --stream_unlabeled`` keeps the path; ``as_streaming`` lists it at loader time."""
    def refuse(*args, **kwargs):
        raise AssertionError("the trainer must not load the unlabeled folder when streaming it")

    monkeypatch.setattr(trainer_module, "load_unlabeled_images", refuse)
    trainer = SemiSupervisedTrainer(tiny_stream_args(tmp_path, synthetic_cache, "--unlabeled_images",
                                                     str(image_folder)))
    assert trainer.data.unlabeled == str(image_folder)
    _, loader = trainer._loaders()
    batch = next(iter(loader))
    assert CONTRACT_KEYS == batch.keys()  # no hidden annotations in a folder
    assert set(batch["image_ids"].tolist()) <= set(range(NUM_IMAGES))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_see_disjoint_images_and_each_pass_reshuffles(image_folder, workers):
    per_pass = NUM_IMAGES // 2 // BATCH  # batches per rank and pass
    ranks = [stream_ids(str(image_folder), rank, 2, 2 * per_pass, workers=workers) for rank in range(2)]
    first_pass = [set(chain(*ids[:per_pass])) for ids in ranks]
    assert first_pass[0].isdisjoint(first_pass[1])
    assert first_pass[0] | first_pass[1] == set(range(NUM_IMAGES))
    second_pass = list(chain(*ranks[0][per_pass:]))
    assert len(set(second_pass)) == NUM_IMAGES // 2  # a whole share again, each image once
    assert second_pass != list(chain(*ranks[0][:per_pass]))  # set_epoch reshuffled
    assert stream_ids(str(image_folder), 0, 2, 2 * per_pass, workers=workers) == ranks[0]  # seeded


def test_the_views_change_with_the_pass(image_folder):
    """``set_epoch`` reaches the pair wrapper: an image's views in pass 1 differ from those in pass 0."""
    loader = unlabeled_stream_loader(str(image_folder), TRANSFORM, NUM_IMAGES, seed=3, rank=0, world_size=1)
    iterator = iter(loader)
    passes = [next(iterator) for _ in range(2)]
    matrices = [dict(zip(b["image_ids"].tolist(), b["weak_to_strong"])) for b in passes]
    assert matrices[0].keys() == matrices[1].keys() == set(range(NUM_IMAGES))
    assert any(not torch.equal(matrices[0][i], matrices[1][i]) for i in range(NUM_IMAGES))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_continues_with_the_same_images(image_folder, workers):
    """After 5 consumed batches (odd with 2 workers, past the end of the first pass) the resumed loader yields the
    uninterrupted run's batches 5, 6, 7, 8: the same images with the same views."""
    straight = stream_batches(str(image_folder), 1, 2, 9, workers=workers)
    resumed = stream_batches(str(image_folder), 1, 2, 4, start_batch=5, workers=workers)
    assert [b["image_ids"].tolist() for b in resumed] == [b["image_ids"].tolist() for b in straight[5:]]
    for expected, batch in zip(straight[5:], resumed):
        torch.testing.assert_close(batch["weak_to_strong"], expected["weak_to_strong"], rtol=0, atol=0)


def test_every_iteration_runs_its_own_passes(image_folder):
    """DataLoader workers run their passes independently, so iterating must not move the stream's epoch, which
    ``datasets`` keeps in memory shared with the workers; and every ``iter`` starts anew."""
    stream = as_streaming(str(image_folder), num_shards=4, seed=3)
    dataset = ResumableStream(stream, lambda rows: rows)  # the rows themselves as items
    iterator = iter(dataset)
    ids = [next(iterator)["image_id"] for _ in range(2 * NUM_IMAGES + 1)]
    assert sorted(ids[:NUM_IMAGES]) == sorted(ids[NUM_IMAGES:2 * NUM_IMAGES]) == list(range(NUM_IMAGES))
    assert stream.epoch == 0
    assert next(iter(dataset))["image_id"] == ids[0]


@pytest.mark.parametrize("rank, world_size, message", [(2, 3, "no row for this process"),
                                                       (0, 1, "no readable row in a whole pass")])
def test_an_empty_or_unreadable_share_raises(rank, world_size, message, caplog):
    """Two rows cannot feed three processes; missing files are skipped with a warning, but a pass without one
    readable image raises instead of looping forever."""
    ds = Dataset.from_dict({"image": ["missing-0.png", "missing-1.png"], "image_id": [0, 1]})
    with pytest.raises(RuntimeError, match=message):
        stream_ids(ds, rank=rank, world_size=world_size, batches=1)


# ---------------------------------------------------------------------------------------------- trainer
def test_trainer_resume_sees_the_same_unlabeled_images(tmp_path, synthetic_cache, monkeypatch):
    """3 steps == 2 steps + checkpoint + ``--resume_from_checkpoint latest`` + 1 step, in unlabeled image ids
    (gradient accumulation 2: the resumed stream skips 2 x 2 x 2 examples). The optimizer step is replaced by a
    recorder to keep this fast; tests/test_trainer.py covers the parameters."""
    def record(self, labeled_batches, unlabeled_batches):
        seen[-1].append([batch["image_ids"].tolist() for batch in unlabeled_batches])
        self.state.step += 1
        return {"loss": torch.tensor(0.0), "stage": self.stage(self.state.step - 1)}

    monkeypatch.setattr(SemiSupervisedTrainer, "optimizer_step", record)
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--query_mode", "none")
    seen = []
    for folder, extra in (("straight", ["--max_steps", "3"]), ("resumed", ["--max_steps", "2"]),
                          ("resumed", ["--max_steps", "3", "--resume_from_checkpoint", "latest"])):
        seen.append([])
        SemiSupervisedTrainer(tiny_stream_args(tmp_path / folder, synthetic_cache, *extra, *common)).train()
    straight, first, second = seen
    assert len(straight) == 3 and len(first) == 2 and len(second) == 1
    assert first + second == straight
    assert len(set(chain(*chain(*straight)))) > 2 * BATCH  # the stream moves on between micro-batches


def test_short_streaming_run_finishes(tmp_path, synthetic_cache):
    args = tiny_stream_args(tmp_path, synthetic_cache, "--max_steps", "2", "--one_to_many_steps", "1",
                            "--checkpointing_steps", "100", "--pseudo_label_threshold", "0.0")
    results = SemiSupervisedTrainer(args).train()
    assert results["steps"] == 2
    assert results["args"]["stream_unlabeled"] is True
    assert (tmp_path / "results.json").is_file() and (tmp_path / "best_model" / "config.json").is_file()
