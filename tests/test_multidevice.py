"""A client using several of the pool's devices (LIBREMOTE_DEVICES=2 on a two-device daemon).

Runs in subprocesses: the device guard that makes autograd work on remote:1 is chosen when
libremote is imported, from LIBREMOTE_DEVICES (see libremote/client/device_guard.py).
"""

from __future__ import annotations

import pytest
from helpers import last_json, pool_daemon, run_python

TRAIN_ON_TWO_DEVICES = """
    import copy, json, torch, libremote
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    results = {"count": torch.cuda.device_count(), "welcome_devices": len(libremote.server_info()["devices"])}
    for device in ("cpu", "cuda:0", "cuda:1"):
        net = copy.deepcopy(model).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(net(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results[device] = {"losses": losses, "param_device": str(next(net.parameters()).device),
                           "grad_device": str(next(net.parameters()).grad.device)}
    # nn.DataParallel over both devices: scatter, replicate, parallel apply, gather, and the
    # replicas' gradients reduced onto cuda:0 (torch.nn.parallel.comm, libremote/client/parallel.py)
    parallel = torch.nn.DataParallel(copy.deepcopy(model).to("cuda:0"), device_ids=[0, 1])
    optimizer = torch.optim.Adam(parallel.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        out = parallel(x.to("cuda:0"))
        loss = torch.nn.functional.mse_loss(out, y.to("cuda:0"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    results["data_parallel"] = {"losses": losses, "out_device": str(out.device),
                                "grad_device": str(next(parallel.parameters()).grad.device)}
    a = torch.randn(6, device="cuda:1")
    b = a.to("cuda:0")
    results["copied_equal"] = torch.equal(a.cpu(), b.cpu()) and str(b.device) == "cuda:0"
    c = torch.empty(6, device="cuda:1")
    c.copy_(b)
    results["copy_between_devices"] = torch.equal(c.cpu(), a.cpu())
    scalar_mixed = torch.where(a > 0, a, 0.5)
    results["where_device"] = str(scalar_mixed.device)
    results["where_values"] = torch.equal(scalar_mixed.cpu(), torch.where(a.cpu() > 0, a.cpu(), 0.5))
    try:
        a + b
        results["mismatch"] = "no error"
    except RuntimeError as exc:
        results["mismatch"] = str(exc)
    torch.cuda.set_device(1)
    results["bare_cuda"] = str(torch.ones(1, device="cuda").device)
    print(json.dumps(results))
"""


def test_a_client_trains_on_two_devices_of_the_pool():
    with pool_daemon(device="cpu,cpu") as server:
        result = run_python(TRAIN_ON_TWO_DEVICES, timeout=600, LIBREMOTE_SERVER=server.address, LIBREMOTE_DEVICES="2")
        assert result.returncode == 0, result.stderr
        out = last_json(result.stdout)
    assert out["count"] == 2 and out["welcome_devices"] == 2, out
    for device in ("cuda:0", "cuda:1"):
        assert out[device]["param_device"] == device and out[device]["grad_device"] == device, out
        assert out[device]["losses"] == out["cpu"]["losses"], (device, out)
    parallel = out["data_parallel"]
    assert parallel["out_device"] == "cuda:0" and parallel["grad_device"] == "cuda:0", out
    assert parallel["losses"] == pytest.approx(out["cpu"]["losses"], rel=1e-5), out
    assert out["copied_equal"] and out["copy_between_devices"], out
    assert out["where_device"] == "cuda:1" and out["where_values"], out
    assert "same device" in out["mismatch"] and "cuda:1" in out["mismatch"] and "cuda:0" in out["mismatch"], out
    assert out["bare_cuda"] == "cuda:1", out


def test_asking_for_more_devices_than_the_pool_has_is_refused():
    code = """
        import json, torch, libremote
        try:
            torch.ones(1).cuda()
            print(json.dumps({"error": None}))
        except libremote.ConnectionFailed as exc:
            print(json.dumps({"error": str(exc)}))
    """
    with pool_daemon(device="cpu,cpu") as server:
        result = run_python(code, timeout=600, LIBREMOTE_SERVER=server.address, LIBREMOTE_DEVICES="3")
    assert result.returncode == 0, result.stderr
    error = last_json(result.stdout)["error"]
    assert error and "LIBREMOTE_DEVICES" in error and "at most 2" in error, error
