"""A real third-party training framework, unmodified: Hugging Face accelerate on the daemon's GPU.

examples/accelerate_train_checkpoint.py is written the way accelerate's docs show (``Accelerator()``,
model with tied weights and optimizer built before ``accelerator.prepare``,
``accelerator.backward``, ``save_state`` / ``load_state``). It runs opted in with only
``LIBREMOTE_SERVER``, and again on local CPU torch (CUDA hidden); accelerate must pick ``cuda``
under libremote, and the losses, the random generators' round trip, the checkpoint files (read
back with plain torch on the CPU) and the final parameters must agree with the local run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import accelerate  # noqa: F401  (required by requirements-dev.txt: a missing one fails here, not skips)
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from helpers import start_program

PROGRAM = REPO / "examples" / "accelerate_train_checkpoint.py"
RTOL, ATOL = 1e-4, 1e-5


def start(out: Path, **env: str) -> subprocess.Popen:
    out.mkdir()
    return start_program(str(PROGRAM), str(out), **env)


def report(process: subprocess.Popen) -> dict[str, Any]:
    """The program's JSON line, once it exited cleanly."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def storage_locations(path: Path) -> list[str]:
    """Where ``torch.save`` recorded each storage of the file (``cpu``, ``cuda:0``)."""
    locations: list[str] = []
    torch.load(path, map_location=lambda storage, location: locations.append(location) or storage)
    return locations


@pytest.fixture(scope="module")
def runs(daemon, tmp_path_factory) -> dict[str, tuple[dict[str, Any], Path]]:
    """The program on local CPU torch and through libremote, run side by side."""
    root = tmp_path_factory.mktemp("accelerate")
    processes = {
        "local": start(root / "local", CUDA_VISIBLE_DEVICES=""),
        "remote": start(root / "remote", LIBREMOTE_SERVER=daemon.address),
    }
    return {name: (report(process), root / name) for name, process in processes.items()}


def test_accelerate_picks_the_remote_gpu(runs):
    remote, local = runs["remote"][0], runs["local"][0]
    assert (remote["device"], remote["parameter_device"]) == ("cuda", "cuda:0")
    assert (local["device"], local["parameter_device"]) == ("cpu", "cpu")
    assert remote["distributed_type"] == local["distributed_type"] == "DistributedType.NO"


def test_training_and_state_round_trip_as_on_local_torch(runs):
    (remote, _), (local, _) = runs["remote"], runs["local"]
    assert remote["tied"] and local["tied"]
    first, second, third = local["losses"]
    assert first[-1] < first[0] and second[0] < first[-1]
    for report_ in (remote, local):  # load_state brought back the state save_state wrote ...
        assert report_["losses"][2] == report_["losses"][1]
        assert report_["rng_probes"][1] == report_["rng_probes"][0]  # ... the CPU and device generators too
    for phase in range(3):
        assert remote["losses"][phase] == pytest.approx(local["losses"][phase], rel=RTOL, abs=ATOL)
    assert remote["rng_probes"][0][:2] == local["rng_probes"][0][:2]  # the CPU generator


def test_checkpoint_reads_back_with_plain_torch_as_the_local_one(runs):
    remote, local = runs["remote"][1] / "checkpoint", runs["local"][1] / "checkpoint"
    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in local.iterdir())
    remote_model, local_model = load_file(remote / "model.safetensors"), load_file(local / "model.safetensors")
    assert "head.weight" not in local_model  # accelerate saved the tied weight once ...
    assert remote_model.keys() == local_model.keys()  # ... and found the tie on the device too
    for name, value in local_model.items():
        torch.testing.assert_close(remote_model[name], value, rtol=RTOL, atol=ATOL, msg=name)
    remote_optimizer = torch.load(remote / "optimizer.bin", map_location="cpu")
    local_optimizer = torch.load(local / "optimizer.bin")
    assert remote_optimizer["param_groups"] == local_optimizer["param_groups"]
    torch.testing.assert_close(remote_optimizer["state"], local_optimizer["state"], rtol=RTOL, atol=ATOL)
    # As torch writes a CUDA optimizer: moments on the GPU, AdamW's step counters on the host.
    assert storage_locations(remote / "optimizer.bin") == ["cpu", "cuda:0", "cuda:0"] * 3


def test_saved_final_state_keeps_the_tie(runs):
    remote = torch.load(runs["remote"][1] / "final.pt", map_location="cpu")
    local = torch.load(runs["local"][1] / "final.pt")
    assert storage_locations(runs["remote"][1] / "final.pt") == ["cuda:0"] * 3  # one storage for the tie
    for state in (remote, local):
        assert state["head.weight"].untyped_storage().data_ptr() == state["embed.weight"].untyped_storage().data_ptr()
    assert remote.keys() == local.keys()
    for name, value in local.items():
        torch.testing.assert_close(remote[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_fp16_mixed_precision_with_grad_scaler(daemon, runs, tmp_path):
    """``accelerate launch --mixed_precision fp16`` (its environment variable): autocast to half
    and a GradScaler on the remote GPU, whose state is checkpointed too."""
    remote = report(start(tmp_path / "fp16", LIBREMOTE_SERVER=daemon.address, ACCELERATE_MIXED_PRECISION="fp16"))
    local = runs["local"][0]
    assert remote["device"] == "cuda" and remote["tied"]
    assert remote["losses"][2] == remote["losses"][1]
    assert remote["losses"][0] != local["losses"][0]  # the forward ran in half precision
    for phase in range(3):
        assert remote["losses"][phase] == pytest.approx(local["losses"][phase], rel=1e-2)
    scaler = torch.load(tmp_path / "fp16" / "checkpoint" / "scaler.pt")
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
