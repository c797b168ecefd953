"""Building and loading checkpoints safely: nothing the user owns is deleted, damaged shards are named with the
fix, and concurrent builders (two kernels, two test workers) share one build and leave nothing half-written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xcomp_lab.model import checkpoint, manifest
from xcomp_lab.model.checkpoint import DONE_MARKER, build_checkpoint, move_into_place, trained_tiny_checkpoint
from xcomp_lab.model.loading import load_model
from xcomp_lab.model.manifest import MANIFEST_NAME, STAMP_NAME, DamagedCheckpointError, verify_checkpoint

SHARD = "model-00001-of-00001.safetensors"
WORKER = Path(__file__).with_name("checkpoint_safety_worker.py")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("XCOMP_LAB_CACHE", str(cache))
    return cache


def build(out_dir: Path, dtype: str = "float16", **options) -> Path:
    return build_checkpoint("tiny", dtype, seed=0, out_dir=out_dir, progress=False, **options)


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".partial-" in path.name or ".replaced-" in path.name)


# ----- nothing the user owns is deleted ----------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_checkpoint_is_refused_and_left_intact(tmp_path: Path, overwrite: bool):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "notes.txt").write_text("months of work")
    with pytest.raises(FileExistsError, match=r"not a course checkpoint.*notes\.txt.*delete this one yourself"):
        build(folder, overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "months of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no lock, no staging folder beside it


@pytest.mark.parametrize("out_dir", [".", "..", "work"])
def test_the_working_directory_and_its_parents_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "analysis.ipynb").write_text("{}")
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match="not a course checkpoint|current working directory"):
        build(Path(out_dir) if out_dir != "work" else work, overwrite=True)
    assert (work / "analysis.ipynb").read_text() == "{}"
    assert Path.cwd() == work


def test_an_empty_working_directory_is_refused_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="current working directory"):
        build(Path("."))
    assert Path.cwd() == tmp_path and list(tmp_path.iterdir()) == []


def test_a_file_is_refused(tmp_path: Path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="is a file"):
        build(target, overwrite=True)
    assert target.read_bytes() == b"mine"


def test_course_checkpoints_are_reused_rebuilt_on_request_and_never_mixed_up(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build(empty) == empty and (empty / MANIFEST_NAME).is_file()  # an empty folder is fine
    shard = (empty / SHARD).stat()
    assert build(empty) == empty and (empty / SHARD).stat().st_ino == shard.st_ino  # reused, not rebuilt
    with pytest.raises(FileExistsError, match="not the one asked for.*overwrite=True"):
        build(empty, dtype="float32")
    assert build(empty, dtype="float32", overwrite=True) == empty
    assert json.loads((empty / DONE_MARKER).read_text())["dtype"] == "float32"
    assert (empty / SHARD).stat().st_ino != shard.st_ino
    model, _ = load_model(empty)
    assert next(model.parameters()).dtype == torch.float32
    assert leftovers(tmp_path) == []


def test_a_cached_checkpoint_from_before_manifests_is_rebuilt(private_cache: Path):
    directory = build_checkpoint("tiny", progress=False)
    (directory / MANIFEST_NAME).unlink()  # as an older xcomp_lab left it
    assert build_checkpoint("tiny", progress=False) == directory
    assert (directory / MANIFEST_NAME).is_file()
    assert leftovers(directory.parent) == []


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new.lock"]


def test_move_into_place_refuses_a_foreign_folder_and_keeps_the_finished_checkpoint(tmp_path: Path):
    made = build(tmp_path / "made")
    staging = tmp_path / "trained.partial-1"
    made.rename(staging)
    (staging / MANIFEST_NAME).unlink()
    foreign = tmp_path / "trained"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"keep\.txt.*kept at .*trained\.partial-1"):
        move_into_place(staging, foreign)
    assert (foreign / "keep.txt").read_text() == "mine" and (staging / SHARD).is_file()
    assert move_into_place(staging, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert not staging.exists() and (tmp_path / "elsewhere" / MANIFEST_NAME).is_file()


# ----- damaged shards are named, with the fix ----------------------------------------------------


def overwrite_middle(path: Path, count: int = 4096) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(os.urandom(count))
    assert path.stat().st_size == size


def test_garbage_in_the_middle_of_a_shard_is_named_with_the_rebuild_call(tmp_path: Path):
    directory = build(tmp_path / "ckpt")
    load_model(directory)
    overwrite_middle(directory / SHARD)
    with pytest.raises(DamagedCheckpointError, match=rf"{re.escape(SHARD)} is damaged: its sha256 checksum") as error:
        load_model(directory)
    assert f"build_checkpoint('tiny', 'float16', seed=0, out_dir='{directory}', overwrite=True)" in str(error.value)
    assert build(directory, overwrite=True) == directory
    load_model(directory)


def test_the_damaged_default_checkpoint_names_the_folder_to_delete():
    directory = trained_tiny_checkpoint()
    overwrite_middle(directory / "model.safetensors")
    expected = rf"model\.safetensors is damaged.*Delete the folder {re.escape(str(directory))}"
    with pytest.raises(DamagedCheckpointError, match=expected):
        load_model()


@pytest.mark.parametrize("manifest_kept", [True, False], ids=["course", "real-style"])
@pytest.mark.parametrize("keep_bytes", [0, 6, 1000, -100], ids=["empty", "6 bytes", "header cut", "data cut"])
def test_truncated_and_empty_shards_are_named(tmp_path: Path, manifest_kept: bool, keep_bytes: int):
    directory = build(tmp_path / "ckpt")
    if not manifest_kept:
        (directory / MANIFEST_NAME).unlink()
    shard = directory / SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[:keep_bytes])
    fix = "overwrite=True" if manifest_kept else "download, copy or build it again"
    with pytest.raises(DamagedCheckpointError, match=rf"{re.escape(SHARD)} is damaged: .*(empty|truncated).*{fix}"):
        load_model(directory)


def test_a_real_style_checkpoint_without_manifest_still_loads(tmp_path: Path, tiny_model):
    model, tokenizer = tiny_model
    out = tmp_path / "saved"
    checkpoint.write_model_files(out, model.config, tokenizer)
    model.save_pretrained(out)
    assert not (out / MANIFEST_NAME).exists()
    reloaded, _ = load_model(out, dtype="float32")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_a_verified_shard_is_hashed_again_only_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(manifest, "RACY_NS", 0)  # stamp at once instead of after two seconds
    directory = build(tmp_path / "ckpt")
    hashed = []
    real_digest = manifest.file_digest
    monkeypatch.setattr(manifest, "file_digest", lambda path, *a: hashed.append(path.name) or real_digest(path, *a))
    verify_checkpoint(directory)
    assert (directory / STAMP_NAME).is_file()
    hashed.clear()
    verify_checkpoint(directory)
    assert hashed == []
    time.sleep(0.05)  # past the file system's timestamp tick
    overwrite_middle(directory / SHARD)
    with pytest.raises(DamagedCheckpointError, match=re.escape(SHARD)):
        verify_checkpoint(directory)
    assert hashed == [SHARD]


def test_a_recently_changed_shard_is_not_stamped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(manifest, "RACY_NS", 3600 * 10**9)
    directory = build(tmp_path / "ckpt")
    verify_checkpoint(directory)
    assert not (directory / STAMP_NAME).exists()  # changed less than RACY_NS ago: a change could hide in its tick
    monkeypatch.setattr(manifest, "RACY_NS", 0)
    verify_checkpoint(directory)
    assert SHARD in json.loads((directory / STAMP_NAME).read_text())


# ----- concurrent builders -----------------------------------------------------------------------


@pytest.mark.slow  # two fresh interpreters import torch and transformers: 10-20 s on a 2-core CPU, the builds ~1 s
def test_two_processes_building_the_same_checkpoints_at_once_share_one_build(tmp_path: Path, private_cache: Path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "XCOMP_LAB_CACHE": str(private_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(barrier), str(index), "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    failures = {(index, name): got["error"] for index, rounds in enumerate(results) for name, got in rounds.items()
                if "error" in got}
    assert failures == {}
    assert results[0] == results[1]  # the same directories, with the same weights
    checkpoints = private_cache / "checkpoints"
    assert leftovers(checkpoints) == []
    built = sorted(path.name for path in checkpoints.iterdir() if not path.name.endswith(".lock"))
    assert built == sorted({Path(got["path"]).name for got in results[0].values()})
    assert len(built) == 3  # random seed 0 and seed 1, trained
    for name in built:
        verify_checkpoint(checkpoints / name)
