"""A stage on another rank's GPU (two processes; one GPU can host the stage). Over gloo, the
frames travel through the host; device-to-device transfers (NCCL) are not built yet."""
from __future__ import annotations

import torch
from test_distributed import _clean, launch, result


def test_distributed_stage_on_a_remote_gpu(tmp_path):
    _clean(launch("cuda_stage", tmp_path))
    r = result(tmp_path)
    assert len(r["got"]) == 16 and all(g.device.type == "cpu" for g in r["got"])
    for got, want in zip(r["got"], r["expected"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
