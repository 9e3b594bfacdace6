"""The dense bf16 peak used for MFU, looked up by the exact name torch reports for the GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from trainer.metrics import PEAK_TFLOPS, known_peak_tflops, peak_tflops

DATA_SHEETS = {  # dense bf16 tensor-core TFLOP/s (half the "with sparsity" figure)
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM-80GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
}


@pytest.mark.parametrize(("name", "peak"), DATA_SHEETS.items())
def test_every_known_gpu_has_its_data_sheet_peak(name, peak):
    assert known_peak_tflops(name) == peak


def test_the_table_holds_exactly_the_checked_gpus():
    assert PEAK_TFLOPS == DATA_SHEETS


@pytest.mark.parametrize("name", ["nvidia h100 nvl", " NVIDIA  H100 NVL "])
def test_case_and_spacing_do_not_matter(name):
    assert known_peak_tflops(name) == 835.0


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA GeForce RTX 4090",
        "NVIDIA H100",  # no such name from torch: not guessed as any H100 variant
        "NVIDIA L4 Ultra",  # contains "NVIDIA L4" but is not an L4
        "NVIDIA A10G",
        "",
    ],
)
def test_unknown_or_near_miss_name_has_no_peak(name):
    assert known_peak_tflops(name) is None


def test_the_configured_peak_wins_and_the_cpu_has_none():
    assert peak_tflops(123.0, torch.device("cuda", 0)) == 123.0
    assert peak_tflops(None, torch.device("cpu")) is None


def test_unknown_gpu_logs_how_to_set_the_peak(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")  # no GPU here
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        assert peak_tflops(None, torch.device("cuda", 0)) is None
    assert "'NVIDIA Future GPU'" in caplog.text and "set train.peak_tflops" in caplog.text


def test_known_gpu_by_its_torch_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    assert peak_tflops(None, torch.device("cuda", 0)) == 835.0
