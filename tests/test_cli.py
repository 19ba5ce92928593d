"""The fastnmf command: help, info, bench-layer; the pipeline commands are in test_pipeline.py."""

import subprocess
import sys
import types

import torch

from fastnmf.cli import main

SUBCOMMANDS = ("train", "infer", "evaluate", "compare", "components", "info", "bench-layer")


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out, name


def test_info(capsys):
    assert main(["info"]) == 0
    assert "kernels:" in capsys.readouterr().out


def test_info_names_the_gpus_sms_and_l2(monkeypatch, capsys):
    """What the static model assumes of the GPU (kernels/DESIGNS.md: the L2 decides the DRAM
    estimate), printed where the GPU session's setup logs it."""
    props = types.SimpleNamespace(major=9, minor=0, multi_processor_count=132,
                                  L2_cache_size=50 * 2**20, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    assert main(["info"]) == 0
    assert ("CUDA device: NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, L2 50 MiB, 80 GiB)"
            in capsys.readouterr().out)


def test_bench_layer_runs_and_kernels_agree(capsys):
    assert main(["bench-layer", "--size", "16", "--channels", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "kernel=torch" in out and "kernel=reference" in out
    line = next(s for s in out.splitlines() if "max |reference - torch|" in s)
    err = float(line.split("output")[1].split(",")[0])
    assert err < 1e-4


def test_bad_argument_exit_code(capsys):
    assert main(["bench-layer", "--size", "12", "--window", "8", "--repeats", "1"]) == 2
    assert "not divisible by window" in capsys.readouterr().err


def test_console_module_entry():
    out = subprocess.run(
        [sys.executable, "-m", "fastnmf", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out, name
