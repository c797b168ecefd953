"""The notebooks' parameters: a results file that cannot be written and sizes past the course's limits fail at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xcomp_lab.core.checks import BATCH_SIZE, IMAGE_SIZE, NEW_TOKENS
from xcomp_lab.course.params import check_params



@pytest.mark.parametrize("results_path, words", [
    ("/sys/x.jsonl", r"results_path='/sys/x.jsonl' cannot be written \("),  # read-only, even for root
    ("/proc/x.jsonl", r"results_path='/proc/x.jsonl' cannot be written \(No such file or directory\); every "
                      r"measurement is appended there, so pass a file in a folder you can write to"),
    (None, r"results_path=None; pass the JSON-lines file the notebooks append their records to"),
    ("", r"results_path=''; pass the JSON-lines file"),
    ("  ", r"results_path='  '; pass the JSON-lines file"),
    (7, r"results_path=7; pass the JSON-lines file"),
    (".", r"results_path='.' is a folder; pass a file in it, e.g. 'results.jsonl'"),
])
def test_a_results_path_that_cannot_be_written_is_refused(results_path, words):
    with pytest.raises(ValueError, match=words):
        check_params(device="cpu", results_path=results_path)


def test_a_results_path_under_a_file_is_refused(tmp_path: Path):
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match=r"plain/results.jsonl' cannot be written \((File exists|Not a directory)\)"):
        check_params(device="cpu", results_path=tmp_path / "plain" / "results.jsonl")


def test_a_read_only_results_file_or_folder_is_refused(tmp_path: Path):
    read_only = tmp_path / "read-only.jsonl"
    read_only.write_text("")
    read_only.chmod(0o444)
    if os.access(read_only, os.W_OK):
        pytest.skip("file modes do not bind this user (root with CAP_DAC_OVERRIDE)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for path in (read_only, locked / "results.jsonl", locked / "sub" / "results.jsonl"):
            with pytest.raises(ValueError, match=r"cannot be written \(Permission denied\)"):
                check_params(device="cpu", results_path=path)
    finally:
        locked.chmod(0o755)


def test_checking_the_results_path_makes_its_folder_and_changes_no_file(tmp_path: Path):
    missing = tmp_path / "new" / "folder" / "results.jsonl"
    assert check_params(device="cpu", results_path=missing).results_path == missing
    assert missing.parent.is_dir() and not missing.exists()  # the first record creates the file
    existing = tmp_path / "results.jsonl"
    existing.write_text('{"step": "kept"}\n')
    before = existing.stat()
    check_params(device="cpu", results_path=str(existing))
    assert existing.read_text() == '{"step": "kept"}\n' and existing.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("name, limit, words", [
    ("max_new_tokens", NEW_TOKENS, "chat\\(\\)'s own default answer length"),
    ("image_size", IMAGE_SIZE, "twice the full model's 490 px and the planner's largest"),
    ("batch_size", BATCH_SIZE, "exercise 8.1's largest-batch search tries up to 256"),
])
def test_sizes_past_the_course_limits_are_refused_with_the_limit_and_why(tmp_path: Path, name, limit, words):
    results = tmp_path / "results.jsonl"
    too_big = {"max_new_tokens": 100_000, "image_size": 14_000, "batch_size": 100_000}[name]
    with pytest.raises(ValueError, match=rf"{name}={too_big}; it must be at most {limit.maximum} \({words}"):
        check_params(device="cpu", results_path=results, **{name: too_big})
    assert getattr(check_params(device="cpu", results_path=results, **{name: limit.maximum}), name) == limit.maximum


def test_the_limits_keep_every_size_the_course_uses():
    assert NEW_TOKENS.maximum >= 1024  # chat()'s default max_new_tokens
    assert IMAGE_SIZE.maximum >= 980 and IMAGE_SIZE.maximum % 14 == 0  # the planner's largest image, in patches
    assert BATCH_SIZE.maximum >= 256  # exercise 8.1's search at tiny scale


def test_the_seed_is_bounded_by_what_torch_manual_seed_takes(tmp_path: Path):
    results = tmp_path / "results.jsonl"
    assert check_params(device="cpu", seed=2**64 - 1, results_path=results).seed == 2**64 - 1
    assert torch.initial_seed() == 2**64 - 1
    with pytest.raises(ValueError, match=r"seed=18446744073709551616; it must be at most 18446744073709551615 "
                                         r"\(torch.manual_seed takes 0 to 2\*\*64 - 1\)"):
        check_params(device="cpu", seed=2**64, results_path=results)
    with pytest.raises(ValueError, match=r"seed=-1; it must be an integer from 0 up"):
        check_params(device="cpu", seed=-1, results_path=results)
