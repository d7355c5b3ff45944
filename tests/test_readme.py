"""README's Python blocks run as written, in a fresh interpreter, against a model folder where README says one is
(``outputs/sparse-semi-detr``) and an ``image.jpg``: with the package importable, and, for blocks that pass
``trust_remote_code=True``, with it hidden (a user who never installed it). No prompt, no "not supported" log."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_remote_code import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
HIDE_PACKAGE = 'import sys\nsys.modules["sparse_semi_detr_hf"] = None\n'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    save_tiny_model(folder / "outputs" / "sparse-semi-detr")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored 80 x 60, displayed rotated: 60 x 80 (a phone photo)
    photo.save(folder / "image.jpg", exif=exif)
    for name, shape in [("landscape.jpg", (60, 90, 3)), ("portrait.jpg", (100, 50, 3))]:  # the batching block
        Image.fromarray(np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)).save(folder / name)
    return folder


def _run(code: str, cwd: Path, package_visible: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))
    if package_visible:
        env["PYTHONPATH"] = str(REPO)
    else:
        code = HIDE_PACKAGE + code
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


def test_readme_has_the_usage_blocks():
    assert len(BLOCKS) >= 2 and any("pipeline(" in b for b in BLOCKS)
    assert all("trust_remote_code=True" in b for b in BLOCKS)


@pytest.mark.parametrize("package_visible", [True, False], ids=["installed", "remote_code_only"])
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(workdir, index, package_visible, request):
    if "model.onnx" in BLOCKS[index]:  # the ONNX block reads README's export folder
        exported = workdir / "outputs" / "sparse-semi-detr-onnx"
        if not exported.exists():
            shutil.copytree(request.getfixturevalue("tiny_onnx_export")["onnx_dir"], exported)
    result = _run(BLOCKS[index], workdir, package_visible)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not supported for object-detection" not in result.stderr
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr


def test_readme_blocks_post_process_in_the_displayed_frame(workdir):
    """Bug fixed: the blocks passed the stored size of an EXIF-rotated photo as ``target_sizes`` while the processor
    decodes it as displayed, so the boxes came back in the wrong frame. The blocks decode it as displayed too."""
    blocks = [b for b in BLOCKS if "target_sizes=[image.size[::-1]]" in b]
    assert len(blocks) >= 2
    for block in blocks:
        result = _run(block + "\nprint('SIZE', image.size)\n", workdir, package_visible=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "SIZE (60, 80)" in result.stdout
