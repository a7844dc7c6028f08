"""Library calls leave the process as they found it: thread count, umask, matplotlib backend."""

from __future__ import annotations

import os
import stat

import torch
from torch import nn

from dsctl.checkpoint import save_checkpoint
from dsctl.latency import measure_latency


def test_timing_restores_the_thread_count() -> None:
    from dsctl.bench import BenchSettings, _env

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    reports = measure_latency({"a": nn.Identity()}, torch.zeros(1, 3), warmup=1, min_run_time_s=0.01, rounds=1,
                              threads=other)
    assert reports[0].samples > 0
    assert torch.get_num_threads() == before
    _env(BenchSettings(threads=other))  # what every bench entry point calls first
    assert torch.get_num_threads() == before


def test_checkpoints_get_the_umask_permissions_and_leave_the_umask_alone(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c.pt", {"kind": "x"})
        assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o640
        assert os.umask(0o027) == 0o027  # unchanged by the save
    finally:
        os.umask(old)


def test_report_plots_do_not_switch_the_matplotlib_backend(tmp_path) -> None:
    import matplotlib

    from dsctl.report import ReportRow, plot_report

    before = matplotlib.get_backend()
    rows = [ReportRow("supernet", "m", "k0", "0.5", 10, 5, 80.0, 95.0, latency_ms_b1=1.0, latency_ms_bN=2.0, batch_n=8)]
    paths = plot_report(rows, tmp_path, "t")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert matplotlib.get_backend() == before


def test_a_builder_called_directly_stamps_its_model() -> None:
    """Not only build_model: calling a registered builder gives a model a checkpoint can rebuild."""
    import dsctl
    from dsctl.models.slim_resnet import tiny_ds_resnet

    model = tiny_ds_resnet(num_classes=7, gate_after=2)
    assert model.model_name == "tiny_ds_resnet"
    assert model.model_kwargs == {"num_classes": 7, "gate_after": 2}
    twin = dsctl.build_model(model.model_name, **model.model_kwargs)
    assert twin.model_kwargs == model.model_kwargs and twin.num_classes == 7
