"""The two-GPU runner on a CPU: its argument checks and its refusal (it has not run on two GPUs yet)."""

from __future__ import annotations

import re

import pytest
import torch

from xcomp_lab.tools.gpu_split_run import NotEnoughGpus, main, parse_args, require_gpus


def test_defaults_are_the_course_case():
    args = parse_args(["--out", "results/x"])
    assert (args.per_card_gb, args.dtypes, args.scale) == (24.0, ["float32", "float16"], "full")
    assert args.max_new_tokens == 16
    assert not args.no_one_card


@pytest.mark.parametrize("argv, message", [
    (["--per-card-gb", "0"], r"--per-card-gb 0; give each card's size in GB"),
    (["--per-card-gb", "-24"], r"--per-card-gb -24; give each card's size in GB"),
    (["--dtypes", "float32", "float64"], r"\['float64'\] unknown; choose from \['float32', 'float16', 'bfloat16'\]"),
    (["--scale", "huge"], r"--scale huge; choose one of \['full', 'tiny'\]"),
    (["--max-new-tokens", "0"], r"--max-new-tokens 0; generate at least 1 token"),
])
def test_bad_arguments_are_refused_with_what_to_give(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--out", "results/x", *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_out_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--out" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has two GPUs: the runner would run")
def test_refuses_without_two_gpus_before_writing_anything(tmp_path):
    out = tmp_path / "split"
    with pytest.raises(NotEnoughGpus, match=r"needs at least 2 CUDA GPUs, but [01] (is|are) visible .*"
                                            r"course_split_estimates\(\)"):
        main(["--out", str(out), "--per-card-gb", "24"])
    assert not out.exists()
    with pytest.raises(SystemExit, match=r"needs at least 3 CUDA GPUs"):
        require_gpus(3)


def test_arguments_are_checked_before_the_gpus(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "results/x", "--per-card-gb", "0"])
    assert exit_info.value.code == 2 and "--per-card-gb 0" in capsys.readouterr().err
