"""Memory oversubscription (issue 5): sessions hold more than the device budget; the daemon spills
the least valuable storages to host RAM and restores them before anything touches them.

Every test runs real daemons (``--device cpu --device-memory SIZE --host-spill SIZE``) and real
client processes; clients compute the same thing with plain local torch and compare. Values are
chosen so that every compared result is exact whatever the summation order (small integers in
float32), so ``torch.equal`` is the comparison even for matmuls and reductions. Clients and the
test synchronise through files, never sleeps; subprocess timeouts only prove "no hang".
"""

from __future__ import annotations

import json
import re

import pytest

from helpers import (
    cli,
    finish,
    kill_all,
    last_json,
    pool_daemon,
    run_python,
    session_of,
    spawn_client,
    spawn_holder,
    status,
    wait_for_file,
    wait_status,
)

MiB = 1 << 20
#: Generous bound for one client process ("it did not hang"); spilling on a 2-core CPU is slow.
TIMEOUT_S = 300.0


def run_client(code: str, address: str, **env: str) -> dict:
    result = run_python(code, timeout=TIMEOUT_S, LIBREMOTE_SERVER=address, **env)
    assert result.returncode == 0, f"client failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return last_json(result.stdout)


def residency(report: dict) -> dict:
    device = report["devices"][0]
    assert "residency" in device, f"status has no residency for the device: {json.dumps(device, indent=2)}"
    return device["residency"]


# ------------------------------------------------------------------------------------------------
# 1. One client, working set 4x the device budget: exact results, and the figures show spilling
# ------------------------------------------------------------------------------------------------
CHAIN_CLIENT = """
    import json, torch, libremote
    MiB = 1 << 20
    BUDGET = 16 * MiB
    N = 16                                   # 16 tensors of 4 MiB: 64 MiB, 4x the budget

    g = torch.Generator().manual_seed(1234)
    host = [torch.randint(-8, 9, (1024, 1024), generator=g).float() for _ in range(N)]
    out = {"problems": [], "resident_samples": []}

    def sample(where):
        stats = libremote.memory_stats()
        out["resident_samples"].append([where, stats["resident"], stats["device"]["resident_bytes"]])
        return stats

    def chain(ts, device):
        # Small integers throughout (|x| <= 8): every matmul entry and every sum is an exact
        # float32 integer, whatever order the kernel adds in.
        ts = list(ts)
        results = []
        for r in range(3):
            for i in range(N):                                   # elementwise, fresh tensors
                ts[i] = torch.remainder(ts[i] * 3 + ts[(i + 5) % N], 17) - 8
            for i in range(0, N, 2):                             # in place
                ts[i].mul_(-1).add_(ts[i + 1]).remainder_(17).sub_(8)
            for i in range(0, N, 4):                             # matmul between pairs
                p = ts[i] @ ts[(i + 3) % N]
                results.append(("mm", r, i, p.cpu()))
                ts[i + 1].add_(torch.remainder(p, 17)).remainder_(17).sub_(8)
            sums = torch.stack([t.sum() for t in ts])            # reductions over all of them
            results.append(("sums", r, -1, sums.cpu()))
            results.append(("amax", r, -1, torch.stack([t.amax(dim=1) for t in ts[::3]]).cpu()))
            results.append(("count", r, -1, torch.stack([(t > 0).sum() for t in ts[1::3]]).cpu()))
            if device != "cpu":
                sample(f"round {r}")
        return ts, results

    local_ts, local_results = chain([h.clone() for h in host], "cpu")

    dev = [h.cuda() for h in host]           # uploads: 64 MiB from the host
    torch.cuda.synchronize()
    after_upload = sample("after upload")
    out["after_upload"] = {k: after_upload[k] for k in ("allocated", "resident", "spilled")}

    remote_ts, remote_results = chain(dev, "cuda")
    for (name, r, i, expected), (_, _, _, got) in zip(local_results, remote_results):
        if not torch.equal(expected, got):
            out["problems"].append(f"{name} round {r} index {i} differs")
    for i, (expected, got) in enumerate(zip(local_ts, remote_ts)):
        if not torch.equal(expected, got.cpu()):
            out["problems"].append(f"tensor {i} differs after the chain")
    # Re-read every original upload too: the uploads survived being spilled.
    for i, (h, d) in enumerate(zip(host, dev)):
        if not torch.equal(h, d.cpu()):
            out["problems"].append(f"upload {i} differs")
    del dev, d                               # (d: the loop's last upload)
    torch.cuda.synchronize()
    stats = sample("end")
    out["final"] = stats
    out["virtual_total"] = sum(t.numel() * t.element_size() for t in remote_ts)
    out["torch_cuda_allocated"] = torch.cuda.memory_allocated()
    print(json.dumps(out), flush=True)
"""


def test_working_set_four_times_the_budget_gives_exact_results():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client(CHAIN_CLIENT, server.address)
        report = status(server.address)
    assert out["problems"] == [], out["problems"]
    budget = 16 * MiB
    assert out["after_upload"]["allocated"] == 64 * MiB, out["after_upload"]
    assert out["after_upload"]["resident"] <= budget, out["after_upload"]
    assert out["after_upload"]["spilled"] >= 48 * MiB, out["after_upload"]
    for where, session_resident, device_resident in out["resident_samples"]:
        assert session_resident <= budget and device_resident <= budget, (where, session_resident, device_resident)
    final = out["final"]
    assert final["allocated"] == out["virtual_total"] == 64 * MiB, final
    assert out["torch_cuda_allocated"] == 64 * MiB, out
    assert final["spilled"] > 0, final
    assert final["resident"] <= budget, final
    assert final["resident"] + final["spilled"] == final["allocated"], final
    device = final["device"]
    assert device["resident_bytes"] <= budget, device
    assert device["evictions"] > 0 and device["restores"] > 0, device
    assert device["bytes_evicted"] > 0 and device["bytes_restored"] > 0, device
    assert device["spilled_bytes"] == final["spilled"], device  # the only session on the device
    # The client is gone: the daemon released everything it held, resident and spilled.
    assert residency(report)["resident_bytes"] == 0 and residency(report)["spilled_bytes"] == 0, report
    assert residency(report)["evictions"] >= device["evictions"], report


# ------------------------------------------------------------------------------------------------
# 2. Views and in-place writes across eviction and restore
# ------------------------------------------------------------------------------------------------
VIEWS_CLIENT = """
    import json, torch, libremote
    MiB = 1 << 20
    out = {"problems": [], "spilled_before": {}}

    g = torch.Generator().manual_seed(7)
    base_h = torch.randint(-100, 100, (1024, 1024), generator=g).float()   # 4 MiB
    base = base_h.cuda()
    rows, cols, flat, col = base[100:300], base.t(), base.view(-1, 4096), base[:, 7]
    top, bottom = base.view(2048, 512), base[512:]      # two views sharing the one storage

    def spill_everything_but_nothing_else_held(label):
        # 6 x 4 MiB of other data (1.5x the 16 MiB budget) pushes the least recently used
        # storage, base's, to host RAM; freeing them leaves base as this session's only storage,
        # so "spilled == allocated" proves base itself is spilled right now.
        fill = [torch.full((1024, 1024), float(i), device="cuda") for i in range(6)]
        total = torch.stack([f.sum() for f in fill]).sum().item()
        assert total == sum(range(6)) * 1024 * 1024, total
        del fill
        torch.cuda.synchronize()
        stats = libremote.memory_stats()
        out["spilled_before"][label] = [stats["spilled"], stats["allocated"]]
        return stats

    def check(label, remote, local):
        got = remote.cpu()
        if not torch.equal(got, local):
            out["problems"].append(f"{label}: {(got != local).sum().item()} elements differ")

    spill_everything_but_nothing_else_held("read views")
    before = libremote.memory_stats()["device"]["restores"]
    check("rows", rows, base_h[100:300])
    check("transpose", cols, base_h.t())
    check("view", flat, base_h.view(-1, 4096))
    check("column", col, base_h[:, 7])
    out["restored_by_reading"] = libremote.memory_stats()["device"]["restores"] - before
    out["spilled_after_read"] = libremote.memory_stats()["spilled"]

    spill_everything_but_nothing_else_held("in-place through a slice")
    rows.mul_(2); base_h[100:300].mul_(2)
    check("base after rows.mul_", base, base_h)

    spill_everything_but_nothing_else_held("in-place through a transpose")
    cols[5].add_(1); base_h.t()[5].add_(1)
    check("base after cols[5].add_", base, base_h)
    check("column after cols[5].add_", col, base_h[:, 7])

    spill_everything_but_nothing_else_held("setitem through a view")
    flat[3, :10] = -7.0; base_h.view(-1, 4096)[3, :10] = -7.0
    check("base after flat[3, :10] = -7", base, base_h)

    spill_everything_but_nothing_else_held("write through one view, read through another")
    top[1024:1030].fill_(3.0); base_h.view(2048, 512)[1024:1030].fill_(3.0)
    check("bottom after top.fill_", bottom, base_h[512:])
    spill_everything_but_nothing_else_held("read the other way")
    bottom[0:2, 0:100].copy_(torch.arange(200.0).view(2, 100))
    base_h[512:][0:2, 0:100].copy_(torch.arange(200.0).view(2, 100))
    check("top after bottom.copy_", top, base_h.view(2048, 512))

    spill_everything_but_nothing_else_held("a view made while spilled")
    late = base[5:9, 100:200]                 # a new view of a spilled storage
    late.zero_(); base_h[5:9, 100:200].zero_()
    check("late view", late, base_h[5:9, 100:200])
    check("base after late.zero_", base, base_h)
    check("rows still aliases base", rows, base_h[100:300])

    spill_everything_but_nothing_else_held("out-of-place from views")
    mixed = (rows[:, :200] @ cols[:200, :50]) + col[100:300, None]
    check("matmul of two views of one spilled storage", mixed, (base_h[100:300, :200] @ base_h.t()[:200, :50]) + base_h[100:300, 7, None])

    out["final"] = libremote.memory_stats()
    print(json.dumps(out), flush=True)
"""


def test_views_and_in_place_writes_survive_eviction_and_restore():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client(VIEWS_CLIENT, server.address)
    assert out["problems"] == [], out["problems"]
    # Before every step base (4 MiB, the session's only storage then) really was in host RAM.
    for label, (spilled, allocated) in out["spilled_before"].items():
        assert allocated == 4 * MiB and spilled == 4 * MiB, (label, spilled, allocated)
    assert out["restored_by_reading"] >= 1, out
    assert out["spilled_after_read"] == 0, out
    assert out["final"]["device"]["evictions"] > 0 and out["final"]["device"]["restores"] > 0, out["final"]


# ------------------------------------------------------------------------------------------------
# 3. Training when parameters and optimizer state do not fit
# ------------------------------------------------------------------------------------------------
TRAIN_CLIENT = """
    import json, torch, libremote
    import torch.nn.functional as F
    from torch import nn
    MiB = 1 << 20

    def train(device):
        torch.manual_seed(0)
        # 4 layers of 1024x1024 (16 MiB of weights), Adam: weights + grads + 2 moments = 64 MiB,
        # 4x the 16 MiB budget. (No single op needs more than 12 MiB resident at once.)
        model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        data = torch.Generator().manual_seed(1)
        inputs = torch.randn(32, 1024, generator=data).to(device)
        targets = torch.randn(32, 1024, generator=data).to(device)
        losses, stats = [], []
        for _ in range(4):
            optimizer.zero_grad()
            loss = F.mse_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if device != "cpu":
                stats.append(libremote.memory_stats())
        params = [p.detach().cpu() for p in model.parameters()]
        state = [s.cpu() for p in model.parameters() for s in (optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])]
        return losses, params, state, stats

    local_losses, local_params, local_state, _ = train("cpu")
    remote_losses, remote_params, remote_state, stats = train("cuda")
    torch.testing.assert_close(torch.tensor(remote_losses), torch.tensor(local_losses), rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(exp_avg_sq): where that is tiny, a last-bit difference in a gradient
    # (the daemon's matmul may split its reduction across threads differently from this process)
    # moves a weight by ~lr * 1e-3. Spilling bugs show as wrong values, far beyond this tolerance.
    for name, remote, local in (("param", remote_params, local_params), ("state", remote_state, local_state)):
        for i, (r, l) in enumerate(zip(remote, local)):
            torch.testing.assert_close(r, l, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name} {i}: {m}")
    print(json.dumps({"local": local_losses, "remote": remote_losses, "stats": stats}), flush=True)
"""


def test_training_with_parameters_and_optimizer_state_over_the_budget():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client(TRAIN_CLIENT, server.address)
    assert len(out["remote"]) == 4 and out["remote"] != [out["remote"][0]] * 4, out  # it trained
    for step in out["stats"]:
        assert step["allocated"] > 48 * MiB, step       # weights, grads and Adam state: > 3x budget
        assert step["resident"] <= 16 * MiB, step
        assert step["device"]["resident_bytes"] <= 16 * MiB, step
        assert step["spilled"] > 0, step
    last = out["stats"][-1]["device"]
    assert last["evictions"] > 0 and last["restores"] > 0, last


# ------------------------------------------------------------------------------------------------
# 4. Several clients at once, together 3x the budget
# ------------------------------------------------------------------------------------------------
CONCURRENT_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    name, folder, seed = os.environ["NAME"], Path(os.environ["DIR"]), int(os.environ["SEED"])
    MiB = 1 << 20

    def work(ts, device, rounds=6):
        ts = list(ts)
        results = []
        for r in range(rounds):
            for i in range(len(ts)):
                ts[i] = torch.remainder(ts[i] * (seed + 2) + ts[i - 1], 17) - 8
            p = ts[0] @ ts[1]
            ts[2].add_(torch.remainder(p, 17)).remainder_(17).sub_(8)
            ts[3].mul_(-1).add_(ts[2].t()).remainder_(17).sub_(8)
            results.append(p.cpu())                               # a 4 MiB fetch every round
            results.append(torch.stack([t.sum() for t in ts]).cpu())
            results.append(ts[r % len(ts)].cpu())
        return ts, results

    g = torch.Generator().manual_seed(seed)
    host = [torch.randint(-8, 9, (1024, 1024), generator=g).float() for _ in range(4)]   # 16 MiB
    local_ts, local_results = work([h.clone() for h in host], "cpu")

    dev = [h.cuda() for h in host]
    torch.cuda.synchronize()
    (folder / (name + ".in")).write_text(libremote.server_info()["session"])
    while not (folder / "go").exists():          # everyone starts together
        time.sleep(0.02)
    remote_ts, remote_results = work(dev, "cuda")
    problems = [f"result {i}" for i, (l, r) in enumerate(zip(local_results, remote_results)) if not torch.equal(l, r)]
    for kind, pairs in (("tensor", zip(local_ts, remote_ts)), ("upload", zip(host, dev))):
        for i, (l, r) in enumerate(pairs):
            if not torch.equal(l, r.cpu()):
                # Diagnosis only: a second fetch tells a corrupted reply from corrupted data.
                again = "right" if torch.equal(l, r.cpu()) else "wrong"
                problems.append(f"{kind} {i} (fetched again: {again})")
    stats = libremote.memory_stats()
    (folder / (name + ".done")).write_text("1")
    while not (folder / "exit").exists():        # hold the data while the test reads the status
        time.sleep(0.02)
    print(json.dumps({"name": name, "result": "OK" if not problems else "WRONG", "problems": problems,
                      "stats": stats}), flush=True)
"""


def test_concurrent_clients_three_times_the_budget_get_exact_results(tmp_path):
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        names = {"a": 11, "b": 22, "c": 33}
        clients = {name: spawn_client(CONCURRENT_CLIENT, server.address, NAME=name, DIR=str(tmp_path), SEED=str(seed))
                   for name, seed in names.items()}
        try:
            for name, client in clients.items():
                wait_for_file(tmp_path / f"{name}.in", client, timeout=TIMEOUT_S)
            report = status(server.address)
            assert len(report["sessions"]) == 3, report
            assert sum(row["memory_allocated"] for row in report["sessions"]) >= 48 * MiB, report
            (tmp_path / "go").touch()
            for name, client in clients.items():
                wait_for_file(tmp_path / f"{name}.done", client, timeout=TIMEOUT_S)
            report = status(server.address)
            table = cli("status", "--server", server.address).stdout
            (tmp_path / "exit").touch()
            results = {}
            for name, client in clients.items():
                out, err = finish(client, f"client {name} hung", timeout=TIMEOUT_S)
                assert server.process.poll() is None, f"the daemon died (exit status {server.process.poll()})"
                assert client.returncode == 0, f"client {name}:\n{out}\n{err}"
                results[name] = last_json(out)
        finally:
            kill_all(list(clients.values()))
        assert {name: r["result"] for name, r in results.items()} == {"a": "OK", "b": "OK", "c": "OK"}, \
            {name: r["problems"] for name, r in results.items()}
        held = residency(report)
        assert held["evictions"] > 0 and held["restores"] > 0, held
        assert held["resident_bytes"] <= 16 * MiB, held
        assert held["spilled_bytes"] >= 32 * MiB, held    # at least 48 MiB held, at most 16 resident
        assert sum(row["memory_spilled"] for row in report["sessions"]) == held["spilled_bytes"], report
        size = r"[\d.]+ (?:B|KiB|MiB|GiB)"
        assert re.search(rf"dev 0: {size} resident \(budget 16\.0 MiB\), {size} spilled to host \(limit 512\.0 MiB\); "
                         rf"since start {size} spilled, {size} restored \({size} prefetched ahead of use\), "
                         rf"{size} freed data dropped without a copy", table), table
        assert "Traceback" not in server.log()


# ------------------------------------------------------------------------------------------------
# 5. Both budgets exhausted: out-of-memory, recovery, and a neighbour unaffected
# ------------------------------------------------------------------------------------------------
EXHAUSTING_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    folder = Path(os.environ["DIR"])
    MiB = 1 << 20
    out = {}
    four = 1024 * 1024                                   # float32 elements in 4 MiB
    # 8 x 4 MiB = 32 MiB against 8 MiB of device and 16 MiB of host: the first five fit
    # (one resident beside the neighbour's megabyte, four spilled), the rest cannot.
    held = [torch.full((four,), float(i + 1), device="cuda") for i in range(5)]
    torch.cuda.synchronize()
    out["after_five"] = libremote.memory_stats()
    extra = []
    try:
        for i in range(5, 8):
            extra.append(torch.full((four,), float(i + 1), device="cuda"))
        out["alloc_line_raised"] = False                 # asynchronous, like CUDA
    except Exception as exc:
        out["alloc_line_raised"] = repr(exc)
    try:
        torch.cuda.synchronize()
        out["sync_raised"] = None
    except torch.cuda.OutOfMemoryError as exc:
        out["sync_raised"] = type(exc).__name__
        out["is_torch_oom"] = isinstance(exc, torch.OutOfMemoryError)
        out["message"] = str(exc)
    out["allocated_after_failure"] = torch.cuda.memory_allocated()
    out["stats_after_failure"] = libremote.memory_stats()
    (folder / "A.failed").write_text("1")
    while not (folder / "A.go").exists():                # the neighbour works meanwhile
        time.sleep(0.02)

    del extra
    del held[:3]
    torch.cuda.synchronize()
    out["allocated_after_free"] = torch.cuda.memory_allocated()
    fresh = torch.full((four,), 9.0, device="cuda")
    fresh.add_(1.0)
    out["sums"] = [t.sum().item() for t in (*held, fresh)]
    out["values_ok"] = all(torch.equal(t.cpu(), torch.full((four,), v)) for t, v in zip((*held, fresh), (4.0, 5.0, 10.0)))
    torch.cuda.synchronize()
    out["final"] = libremote.memory_stats()
    print(json.dumps(out), flush=True)
"""

NEIGHBOUR_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    folder = Path(os.environ["DIR"])
    g = torch.Generator().manual_seed(5)
    x_h = torch.randint(-8, 9, (512, 512), generator=g).float()    # 1 MiB
    x = x_h.cuda()

    def check(phase):
        y = x * 2 + 1
        p = x[:64] @ x[:64].t()
        ok = (torch.equal(y.cpu(), x_h * 2 + 1) and torch.equal(p.cpu(), x_h[:64] @ x_h[:64].t())
              and y.sum().item() == (x_h * 2 + 1).sum().item())
        del y, p
        torch.cuda.synchronize()
        (folder / f"B.{phase}").write_text("OK" if ok else "WRONG")

    for phase in ("before", "during", "after"):
        while not (folder / f"B.go.{phase}").exists():
            time.sleep(0.02)
        try:
            check(phase)
        except Exception as exc:
            (folder / f"B.{phase}").write_text(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"done": True}), flush=True)
"""


def test_exhausted_device_and_host_raise_out_of_memory_and_recover(tmp_path):
    with pool_daemon("--device-memory", "8MiB", "--host-spill", "16MiB") as server:
        # The neighbour asks for high priority (allowed without a tenants file), so the
        # exhausting client's own storages are spilled before the neighbour's megabyte.
        neighbour = spawn_client(NEIGHBOUR_CLIENT, server.address, DIR=str(tmp_path), LIBREMOTE_PRIORITY="high")
        hog = None
        try:
            def neighbour_phase(phase: str) -> str:
                (tmp_path / f"B.go.{phase}").touch()
                wait_for_file(tmp_path / f"B.{phase}", neighbour, timeout=TIMEOUT_S)
                return (tmp_path / f"B.{phase}").read_text()

            assert neighbour_phase("before") == "OK"
            hog = spawn_client(EXHAUSTING_CLIENT, server.address, DIR=str(tmp_path))
            wait_for_file(tmp_path / "A.failed", hog, timeout=TIMEOUT_S)
            report_during = status(server.address)
            assert neighbour_phase("during") == "OK"
            (tmp_path / "A.go").touch()
            out, err = finish(hog, "the exhausting client hung", timeout=TIMEOUT_S)
            assert hog.returncode == 0, f"{out}\n{err}"
            assert neighbour_phase("after") == "OK"
            out_n, err_n = finish(neighbour, "the neighbour hung", timeout=TIMEOUT_S)
            assert neighbour.returncode == 0, err_n
        finally:
            kill_all([c for c in (neighbour, hog) if c is not None])
    result = last_json(out)
    assert result["after_five"]["allocated"] == 20 * MiB, result["after_five"]
    assert result["alloc_line_raised"] is False, result
    assert result["sync_raised"] == "RemoteOutOfMemoryError", result
    assert result["is_torch_oom"], result
    message = result["message"]
    for word in ("resident", "spilled", "8.00 MiB", "16.00 MiB"):
        assert word in message, (word, message)
    assert result["allocated_after_failure"] == 20 * MiB, result   # the refused tensors hold nothing
    assert result["stats_after_failure"]["device"]["spilled_bytes"] <= 16 * MiB, result
    assert result["stats_after_failure"]["device"]["resident_bytes"] <= 8 * MiB, result
    assert result["allocated_after_free"] == 8 * MiB, result
    four = 1024 * 1024
    assert result["sums"] == [4.0 * four, 5.0 * four, 10.0 * four], result
    assert result["values_ok"] is True, result
    assert result["final"]["allocated"] == 12 * MiB, result
    during = residency(report_during)
    assert during["spilled_bytes"] <= 16 * MiB and during["resident_bytes"] <= 8 * MiB, during


# ------------------------------------------------------------------------------------------------
# 6. Eviction follows priority: a low-priority tenant is spilled before a high-priority one
# ------------------------------------------------------------------------------------------------
PRIORITY_TENANTS = """
[tenants.low]
token = "low-secret"
priority = "low"

[tenants.high]
token = "high-secret"
priority = "high"
"""

PRIORITY_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    name, folder, count = os.environ["NAME"], Path(os.environ["DIR"]), int(os.environ["COUNT"])
    elements = int(os.environ["ELEMENTS"])
    g = torch.Generator().manual_seed(len(name))
    host = [torch.randint(-8, 9, (elements,), generator=g).float() for _ in range(count)]

    def wait(step):
        while not (folder / f"{name}.{step}").exists():
            time.sleep(0.02)

    def report(step, **extra):
        stats = libremote.memory_stats()
        (folder / f"{name}.{step}.tmp").write_text(json.dumps({"stats": stats, **extra}))
        os.replace(folder / f"{name}.{step}.tmp", folder / f"{name}.{step}.json")

    wait("alloc1")
    first = int(os.environ["FIRST"])
    dev = [h.cuda() for h in host[:first]]
    torch.cuda.synchronize()
    report("alloc1")
    wait("alloc2")
    dev += [h.cuda() for h in host[first:]]
    torch.cuda.synchronize()
    report("alloc2")
    wait("read")
    sums = [d.sum().item() for d in dev]          # one storage at a time
    ok = sums == [h.sum().item() for h in host] and all(torch.equal(d.cpu(), h) for d, h in zip(dev, host))
    report("read", ok=ok)
    wait("exit")
    print(json.dumps({"name": name, "ok": ok}), flush=True)
"""


def test_low_priority_sessions_are_spilled_before_high_priority_ones(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(PRIORITY_TENANTS)
    with pool_daemon("--tenants", str(tenants), "--device-memory", "16MiB", "--host-spill", "256MiB",
                     "--loopback-admin") as server:  # (the test reads the whole pool's status)
        # low holds 3 x 4 MiB, high 1 x 3.5 MiB: 15.5 of 16 MiB, nothing spilled. Then high adds
        # 2 x 3.5 MiB: 6.5 MiB (two of low's storages) must go, and low has 12 MiB to give, so high
        # keeps all of its own. When low then reads its data one storage at a time, the room it
        # needs comes from its own other storages again (one of them is resident), not from high's.
        low = spawn_client(PRIORITY_CLIENT, server.address, NAME="low", DIR=str(tmp_path), COUNT="3", FIRST="3",
                           ELEMENTS=str(1024 * 1024), LIBREMOTE_TENANT="low", LIBREMOTE_TOKEN="low-secret")
        high = spawn_client(PRIORITY_CLIENT, server.address, NAME="high", DIR=str(tmp_path), COUNT="3", FIRST="1",
                            ELEMENTS=str(896 * 1024), LIBREMOTE_TENANT="high", LIBREMOTE_TOKEN="high-secret",
                            LIBREMOTE_PRIORITY="high")
        clients = [low, high]

        def step(name: str, what: str) -> dict:
            client = low if name == "low" else high
            (tmp_path / f"{name}.{what}").touch()
            wait_for_file(tmp_path / f"{name}.{what}.json", client, timeout=TIMEOUT_S)
            return json.loads((tmp_path / f"{name}.{what}.json").read_text())

        try:
            step("low", "alloc1")
            step("low", "alloc2")                          # low has nothing more to add
            step("high", "alloc1")
            report = status(server.address)
            rows = {name: session_of(report, client.pid) for name, client in (("low", low), ("high", high))}
            assert (rows["low"]["priority"], rows["high"]["priority"]) == ("low", "high"), rows
            assert rows["low"]["memory_spilled"] == 0 and rows["high"]["memory_spilled"] == 0, rows
            assert residency(report)["resident_bytes"] == 15.5 * MiB, report

            step("high", "alloc2")                         # pressure from the high session
            report = status(server.address)
            rows = {name: session_of(report, client.pid) for name, client in (("low", low), ("high", high))}
            assert rows["high"]["memory_allocated"] == 10.5 * MiB, rows
            assert rows["low"]["memory_spilled"] == 8 * MiB, rows
            assert rows["high"]["memory_spilled"] == 0, rows

            low_read = step("low", "read")                 # pressure from the low session itself
            assert low_read["ok"] is True, low_read
            report = status(server.address)
            rows = {name: session_of(report, client.pid) for name, client in (("low", low), ("high", high))}
            assert rows["high"]["memory_spilled"] == 0, rows  # low spilled its own storages to read them
            assert rows["low"]["memory_spilled"] == 8 * MiB, rows

            high_read = step("high", "read")
            assert high_read["ok"] is True, high_read
            assert high_read["stats"]["spilled"] == 0, high_read
            for name in ("low", "high"):
                (tmp_path / f"{name}.exit").touch()
            for client in clients:
                out, err = finish(client, "a priority client hung", timeout=TIMEOUT_S)
                assert client.returncode == 0, f"{out}\n{err}"
                assert last_json(out)["ok"] is True
        finally:
            kill_all(clients)


# ------------------------------------------------------------------------------------------------
# 7. --oversubscribe: admission by the sum of quotas
# ------------------------------------------------------------------------------------------------
OVERSUBSCRIBE_FLAGS = ("--device-memory", "64MiB", "--memory-quota", "48MiB", "--host-spill", "256MiB")


def test_oversubscribe_ratio_one_queues_the_second_client(tmp_path):
    with pool_daemon("--oversubscribe", "1.0", *OVERSUBSCRIBE_FLAGS) as server:
        a = spawn_holder(server.address, tmp_path, "A")
        clients = [a]
        try:
            wait_for_file(tmp_path / "A.in", a, timeout=TIMEOUT_S)
            b = spawn_holder(server.address, tmp_path, "B")   # 48 + 48 MiB > 1.0 x 64 MiB
            clients.append(b)
            report = wait_status(server.address, lambda r: len(r["waiting"]) == 1, "B waiting", clients=clients)
            assert [row["pid"] for row in report["sessions"]] == [a.pid], report
            assert report["waiting"][0]["pid"] == b.pid, report
            assert report["sessions"][0]["memory_quota"] == 48 * MiB, report
            assert not (tmp_path / "B.in").exists()

            (tmp_path / "A.go").touch()
            out, err = finish(a, "A hung", timeout=TIMEOUT_S)
            assert a.returncode == 0, err
            assert last_json(out)["total"] == 6144.0
            wait_for_file(tmp_path / "B.in", b, timeout=TIMEOUT_S)   # admitted once A left
            report = status(server.address)
            assert [row["pid"] for row in report["sessions"]] == [b.pid] and report["waiting"] == [], report
            (tmp_path / "B.go").touch()
            out, err = finish(b, "B hung", timeout=TIMEOUT_S)
            assert b.returncode == 0, err
            assert last_json(out)["admitted"] is True and last_json(out)["total"] == 6144.0
        finally:
            kill_all(clients)


def test_oversubscribe_ratio_two_admits_both(tmp_path):
    with pool_daemon("--oversubscribe", "2.0", *OVERSUBSCRIBE_FLAGS) as server:
        a = spawn_holder(server.address, tmp_path, "A")
        b = spawn_holder(server.address, tmp_path, "B")     # 96 MiB <= 2.0 x 64 MiB
        clients = [a, b]
        try:
            wait_for_file(tmp_path / "A.in", a, timeout=TIMEOUT_S)
            wait_for_file(tmp_path / "B.in", b, timeout=TIMEOUT_S)
            report = status(server.address)
            assert sorted(row["pid"] for row in report["sessions"]) == sorted([a.pid, b.pid]), report
            assert report["waiting"] == [], report
            for name, client in (("A", a), ("B", b)):
                (tmp_path / f"{name}.go").touch()
                out, err = finish(client, f"{name} hung", timeout=TIMEOUT_S)
                assert client.returncode == 0, err
                assert last_json(out)["total"] == 6144.0
        finally:
            kill_all(clients)


# ------------------------------------------------------------------------------------------------
# 8. Fetching and uploading into a spilled tensor
# ------------------------------------------------------------------------------------------------
FETCH_UPLOAD_CLIENT = """
    import json, torch, libremote
    MiB = 1 << 20
    out = {"problems": [], "spilled": {}}
    g = torch.Generator().manual_seed(3)
    x_h = torch.randn(1024, 1024, generator=g)           # 4 MiB, not integers: bytes must round-trip
    x = x_h.cuda()

    def spill(label):
        fill = [torch.full((1024, 1024), float(i), device="cuda") for i in range(6)]
        assert torch.stack([f.sum() for f in fill]).sum().item() == 15 * 1024 * 1024
        del fill
        torch.cuda.synchronize()
        stats = libremote.memory_stats()
        out["spilled"][label] = [stats["spilled"], stats["allocated"]]

    def check(label, remote, local):
        got = remote.cpu()
        if got.dtype != local.dtype or not torch.equal(got, local):
            out["problems"].append(label)

    spill("fetch")
    check("fetch of a spilled tensor", x, x_h)
    spill("fetch of a view")
    check("fetch of a strided view of a spilled tensor", x[::3, 5::7], x_h[::3, 5::7])

    spill("upload whole")
    new = torch.randn(1024, 1024, generator=g)
    x.copy_(new); x_h.copy_(new)
    spill("read after upload whole")
    check("after copy_ of a whole spilled tensor", x, x_h)

    spill("upload into a slice")
    patch = torch.randn(100, 1024, generator=g)
    x[200:300].copy_(patch); x_h[200:300].copy_(patch)
    check("after copy_ into a slice", x, x_h)

    spill("upload into a transpose")
    patch = torch.randn(1024, 16, generator=g)
    x.t()[:, 40:56].copy_(patch); x_h.t()[:, 40:56].copy_(patch)
    check("after copy_ into a transposed view", x, x_h)

    spill("upload with conversion")
    ints = torch.arange(1024 * 1024, dtype=torch.float64).view(1024, 1024) / 7
    x.copy_(ints); x_h.copy_(ints)
    spill("read after conversion")
    check("after copy_ from float64", x, x_h)

    spill("upload broadcast")
    row = torch.randn(1024, generator=g)
    x.copy_(row); x_h.copy_(row)
    check("after broadcasting copy_", x, x_h)
    out["final"] = libremote.memory_stats()
    print(json.dumps(out), flush=True)
"""


def test_fetch_and_upload_of_spilled_tensors_are_exact():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client(FETCH_UPLOAD_CLIENT, server.address)
    assert out["problems"] == [], out["problems"]
    for label, (spilled, allocated) in out["spilled"].items():
        assert allocated == 4 * MiB and spilled == 4 * MiB, (label, spilled, allocated)  # x was in host RAM
    assert out["final"]["device"]["restores"] >= len(out["spilled"]), out["final"]


FETCH_LOOP_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    folder = Path(os.environ["DIR"])
    g = torch.Generator().manual_seed(0)
    x_h = torch.randn(1536 * 1024, generator=g)          # 6 MiB
    x = x_h.cuda()
    torch.cuda.synchronize()
    (folder / "fetcher.in").touch()
    while not (folder / "go").exists():
        time.sleep(0.02)
    wrong = [i for i in range(300) if not torch.equal(x.cpu(), x_h)]
    print(json.dumps({"wrong": wrong}), flush=True)
"""

PRESSURE_LOOP_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    folder = Path(os.environ["DIR"])
    a = torch.ones(1024 * 1024, device="cuda")           # 4 MiB
    torch.cuda.synchronize()
    (folder / "pressure.in").touch()
    while not (folder / "go").exists():
        time.sleep(0.02)
    bad, i = 0, 0
    while not (folder / "stop").exists() and i < 5000:
        b = torch.full((1024 * 1024,), float(i % 5), device="cuda")   # 4 + 4 + 4 MiB: evicts x
        if (a + b).sum().item() != (1 + i % 5) * 1024 * 1024:
            bad += 1
        i += 1
    print(json.dumps({"bad": bad, "rounds": i}), flush=True)
"""


def test_fetch_is_exact_while_another_client_forces_eviction(tmp_path):
    """A FETCH reply's bytes must stay valid until they are sent, even when another session's
    op evicts (frees) that storage right after the fetch ran."""
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        fetcher = spawn_client(FETCH_LOOP_CLIENT, server.address, DIR=str(tmp_path))
        pressure = spawn_client(PRESSURE_LOOP_CLIENT, server.address, DIR=str(tmp_path))
        clients = [fetcher, pressure]
        try:
            wait_for_file(tmp_path / "fetcher.in", fetcher, timeout=TIMEOUT_S)
            wait_for_file(tmp_path / "pressure.in", pressure, timeout=TIMEOUT_S)
            (tmp_path / "go").touch()
            out_f, err_f = finish(fetcher, "the fetching client hung", timeout=TIMEOUT_S)
            (tmp_path / "stop").touch()
            out_p, err_p = finish(pressure, "the pressure client hung", timeout=TIMEOUT_S)
        finally:
            kill_all(clients)
        assert server.process.poll() is None, f"the daemon died (exit status {server.process.poll()}):\n{server.log()}"
        assert fetcher.returncode == 0, err_f
        assert pressure.returncode == 0, err_p
        report = status(server.address)
    assert last_json(out_p)["bad"] == 0, out_p
    assert residency(report)["evictions"] > 0, report
    assert last_json(out_f)["wrong"] == [], f"fetches that returned wrong bytes: {last_json(out_f)['wrong']}"


# ------------------------------------------------------------------------------------------------
# An op whose own operands exceed the budget still runs: they stay resident together
# ------------------------------------------------------------------------------------------------
def test_an_op_larger_than_the_budget_runs_with_its_operands_resident():
    code = """
        import json, torch, libremote
        a_h, b_h = torch.randn(1024, 1024), torch.randn(1024, 1024)   # 4 MiB each, budget 8 MiB
        a, b = a_h.cuda(), b_h.cuda()
        c = a + b                                                     # 12 MiB at once
        d = (c * a).sum()
        print(json.dumps({"exact": torch.equal(c.cpu(), a_h + b_h), "sum_close": abs(d.item() - ((a_h + b_h) * a_h).sum().item()) < 1e-2,
                          "spilled": libremote.memory_stats()["spilled"]}))
    """
    with pool_daemon("--device-memory", "8MiB", "--host-spill", "512MiB") as server:
        out = run_client(code, server.address)
    assert out["exact"] and out["sum_close"], out


# ------------------------------------------------------------------------------------------------
# Eviction looks ahead: what a queued op is about to use is not the one spilled
# ------------------------------------------------------------------------------------------------
def test_eviction_spares_what_queued_ops_are_about_to_use():
    code = """
        import json, torch, libremote
        MiB = 1 << 20
        a = torch.ones(MiB, device="cuda")          # 4 MiB each; budget 12 MiB holds three
        c = torch.full((MiB,), 2.0, device="cuda")
        d = torch.full((MiB,), 3.0, device="cuda")
        torch.cuda.synchronize()
        d.add_(0); a.add_(0); torch.cuda.synchronize()   # c is now the least recently used
        before = libremote.memory_stats()["device"]
        # One batch: making b evicts something; the next op uses c. LRU alone would spill c and
        # bring it straight back; looking at the queue spills another one instead.
        b = torch.full((MiB,), 4.0, device="cuda")
        total = (c * 2).sum()
        value = total.item()
        after = libremote.memory_stats()["device"]
        print(json.dumps({"value": value, "restores": after["restores"] - before["restores"],
                          "evictions": after["evictions"] - before["evictions"]}))
    """
    with pool_daemon("--device-memory", "12MiB", "--host-spill", "512MiB") as server:
        out = run_client(code, server.address)
    assert out["value"] == 4.0 * (1 << 20), out
    assert out["evictions"] >= 1, out
    assert out["restores"] == 0, out


def test_of_what_queued_ops_need_the_one_needed_last_is_spilled_first():
    """Belady's rule over the queue: when everything resident is about to be used, the tensor
    used last goes. Least-recent-use alone would spill c, bring it back and cascade (4 restores)."""
    code = """
        import json, torch, libremote
        MiB = 1 << 20
        c = torch.full((MiB,), 2.0, device="cuda")   # 4 MiB each; the budget holds three
        d = torch.full((MiB,), 3.0, device="cuda")
        a = torch.ones(MiB, device="cuda")
        torch.cuda.synchronize()
        d.add_(0); a.add_(0); torch.cuda.synchronize()   # least recently used first: c, d, a
        before = libremote.memory_stats()["device"]
        # One batch: making b evicts one of c, d, a; the ops after it use c, then d, then a, then b.
        b = torch.full((MiB,), 4.0, device="cuda")
        sums = torch.stack([c.sum(), d.sum(), a.sum(), b.sum()]).cpu()
        after = libremote.memory_stats()["device"]
        print(json.dumps({"sums": sums.tolist(), "restores": after["restores"] - before["restores"]}))
    """
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        out = run_client(code, server.address)
    assert out["sums"] == [2.0 * (1 << 20), 3.0 * (1 << 20), 1.0 * (1 << 20), 4.0 * (1 << 20)], out
    assert out["restores"] == 1, out  # a, spilled for b, comes back once; c and d never left


def test_what_queued_ops_will_need_is_prefetched_into_free_room():
    """Between slices the daemon restores, ahead of use, what the queued commands will read, when
    there is room for it: the op that reads it then finds it resident (no restore on demand)."""
    code = """
        import json, torch, libremote
        MiB = 1 << 20
        a = torch.full((MiB,), 5.0, device="cuda")   # 4 MiB each; the budget holds three
        b = torch.full((MiB,), 6.0, device="cuda")
        c = torch.full((MiB,), 7.0, device="cuda")
        d = torch.full((MiB,), 8.0, device="cuda")   # spills a, the least recently used
        torch.cuda.synchronize()
        before = libremote.memory_stats()["device"]
        del d                                        # room for a again
        s = torch.zeros(4, device="cuda")
        for _ in range(200):                         # several slices of small ops, all in one
                                                     # message with the read of a (LIBREMOTE_BATCH)
            s = s + 1
        total = (a.sum() + s.sum()).item()           # ... then one that reads a
        after = libremote.memory_stats()["device"]
        print(json.dumps({"total": total, "spilled_a": before["spilled_bytes"],
                          **{k: after[k] - before[k] for k in ("prefetches", "restores", "bytes_prefetched")}}))
    """
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        out = run_client(code, server.address, LIBREMOTE_BATCH="1024")
    assert out["total"] == 5.0 * (1 << 20) + 4 * 200, out
    assert out["spilled_a"] == 4 * MiB, out
    assert out["prefetches"] == 1 and out["bytes_prefetched"] == 4 * MiB, out
    assert out["restores"] == 1, out  # the prefetch was its only restore: none on demand


PREFETCHING_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    folder, MiB = Path(os.environ["DIR"]), 1 << 20
    a = torch.full((MiB,), 5.0, device="cuda")            # 4 MiB each; the budget holds three
    spare = [torch.zeros(MiB, device="cuda") for _ in range(3)]   # the third spills a
    del spare
    torch.cuda.synchronize()
    (folder / "A.in").touch()
    while not (folder / "A.go").exists():
        time.sleep(0.05)
    before = libremote.memory_stats()["device"]
    s = torch.zeros(4, device="cuda")
    for _ in range(200):
        s = s + 1
    total = (a.sum() + s.sum()).item()
    after = libremote.memory_stats()["device"]
    print(json.dumps({"total": total, "spilled_a": before["spilled_bytes"],
                      **{k: after[k] - before[k] for k in ("prefetches", "restores")}}), flush=True)
"""

IDLE_CLIENT = """
    import os, time, torch, libremote
    from pathlib import Path
    folder, MiB = Path(os.environ["DIR"]), 1 << 20
    held = [torch.full((MiB,), 9.0, device="cuda") for _ in range(3)]   # fills the budget
    torch.cuda.synchronize()
    (folder / "B.in").touch()
    while not (folder / "B.exit").exists():
        time.sleep(0.05)
    assert all(t.sum().item() == 9.0 * MiB for t in held)
"""


def test_an_idle_sessions_storages_make_room_for_a_busy_ones_prefetch(tmp_path):
    """A session with no queued work gives way to one whose queue needs its spilled data: the
    prefetch spills the idle session's storages, so the busy one never waits on a restore."""
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        busy = spawn_client(PREFETCHING_CLIENT, server.address, DIR=str(tmp_path), LIBREMOTE_BATCH="1024")
        clients = [busy]
        try:
            wait_for_file(tmp_path / "A.in", busy, timeout=TIMEOUT_S)
            idle = spawn_client(IDLE_CLIENT, server.address, DIR=str(tmp_path))
            clients.append(idle)
            wait_for_file(tmp_path / "B.in", idle, timeout=TIMEOUT_S)
            (tmp_path / "A.go").touch()
            out, err = finish(busy, "the busy client hung", timeout=TIMEOUT_S)
            assert busy.returncode == 0, err
            result = last_json(out)
            (tmp_path / "B.exit").touch()
            out, err = finish(idle, "the idle client hung", timeout=TIMEOUT_S)
            assert idle.returncode == 0, err        # its tensors came back intact
        finally:
            kill_all(clients)
    assert result["total"] == 5.0 * MiB + 4 * 200, result
    assert result["spilled_a"] == 4 * MiB, result
    assert result["prefetches"] == 1 and result["restores"] == 1, result


WAITING_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    folder, MiB = Path(os.environ["DIR"]), 1 << 20
    a = torch.full((MiB,), 5.0, device="cuda")            # 4 MiB; the budget holds three such
    torch.cuda.synchronize()
    (folder / "W.in").touch()
    while not (folder / "W.go").exists():                 # meanwhile the other session spills a
        time.sleep(0.05)
    before = libremote.memory_stats()["device"]
    total = a.sum().item()                                # one small batch, sent while the other
    after = libremote.memory_stats()["device"]            # session's long batch runs
    print(json.dumps({"total": total, "spilled_a": before["spilled_bytes"],
                      **{k: after[k] - before[k] for k in ("prefetches", "restores")}}), flush=True)
"""

RUNNING_CLIENT = """
    import os, time, torch, libremote
    from pathlib import Path
    folder, MiB = Path(os.environ["DIR"]), 1 << 20
    held = [torch.full((MiB,), 9.0, device="cuda") for _ in range(3)]   # spills the other's a
    torch.cuda.synchronize()
    del held[0]                                           # room for a again
    s = torch.zeros(4, device="cuda")
    for _ in range(3000):                                 # batches of 1024 small ops
        s = s + 1
    (folder / "W.go").touch()
    assert s.sum().item() == 4 * 3000 and all(t.sum().item() == 9.0 * MiB for t in held)
"""


def test_a_session_waiting_for_its_turn_is_prefetched_for_before_it_runs(tmp_path):
    """A session whose data was spilled while it was idle sends work while another session is
    busy: when its turn comes, its slice starts with a prefetch of what its queued ops read (on
    a GPU, a side-stream copy overlapping the kernels the busy session queued), not with a
    restore on demand in front of its first op."""
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        waiting = spawn_client(WAITING_CLIENT, server.address, DIR=str(tmp_path))
        clients = [waiting]
        try:
            wait_for_file(tmp_path / "W.in", waiting, timeout=TIMEOUT_S)
            running = spawn_client(RUNNING_CLIENT, server.address, DIR=str(tmp_path), LIBREMOTE_BATCH="1024")
            clients.append(running)
            out, err = finish(waiting, "the waiting client hung", timeout=TIMEOUT_S)
            assert waiting.returncode == 0, err
            result = last_json(out)
            _, err = finish(running, "the running client hung", timeout=TIMEOUT_S)
            assert running.returncode == 0, err
        finally:
            kill_all(clients)
    assert result["total"] == 5.0 * MiB, result
    assert result["spilled_a"] == 4 * MiB, result
    assert result["prefetches"] == 1 and result["restores"] == 1, result


def test_a_gpu_without_a_set_budget_keeps_headroom_for_the_cuda_context():
    from libremote_server.broker import default_budget

    GiB = 1 << 30
    assert default_budget("cpu", 64 * GiB) == 64 * GiB  # the CPU backend: all of it
    assert default_budget("cuda:0", 80 * GiB) == 80 * GiB - int(80 * GiB * 0.06)
    assert default_budget("cuda:0", 16 * GiB) == 14 * GiB  # at least 2 GiB headroom
    assert default_budget("cuda:0", 3 * GiB) == 3 * GiB // 2  # never below half


# ------------------------------------------------------------------------------------------------
# An optimizer step larger than the device budget runs in slices that fit
# ------------------------------------------------------------------------------------------------
def test_a_foreach_step_larger_than_the_budget_runs_in_slices_that_fit():
    """Adam's foreach ops name every parameter and state tensor at once: 32 MiB of operands
    against a 16 MiB budget. Whole, the op would need them all resident together (more than the
    device holds); split into slices of indices, nothing is ever resident above the budget, and
    the results equal local torch's bit for bit."""
    code = """
        import json, torch, libremote
        torch.manual_seed(0)
        params = [torch.randn(1024, 1024) for _ in range(4)]        # 4 MiB each
        grads = [torch.randn(1024, 1024) for _ in range(4)]
        remote = [p.cuda().requires_grad_() for p in params]
        local = [p.clone().requires_grad_() for p in params]
        for tensors, grad_list in ((remote, [g.cuda() for g in grads]), (local, grads)):
            for t, g in zip(tensors, grad_list):
                t.grad = g
        for tensors in (remote, local):
            optimizer = torch.optim.Adam(tensors, lr=0.1, foreach=True)
            for _ in range(3):
                optimizer.step()
        stats = libremote.memory_stats()["device"]
        print(json.dumps({"equal": [torch.equal(r.detach().cpu(), l.detach()) for r, l in zip(remote, local)],
                          "peak": stats["peak_resident_bytes"], "budget": stats["device_budget"],
                          "evictions": stats["evictions"]}))
    """
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client(code, server.address)
    assert all(out["equal"]), out
    assert out["evictions"] > 0, out
    assert 0 < out["peak"] <= out["budget"], out


def test_a_captured_step_whose_output_was_spilled_replays_exactly():
    """A captured step writes its results into the same tensors every replay; one of them was
    spilled to host RAM in between (other tensors took the device), so it comes back first."""
    code = """
        import json, torch, libremote
        torch.manual_seed(0)
        w = torch.randint(-8, 9, (1024, 1024)).float()                     # 4 MiB, budget 8 MiB
        xs = [torch.randint(-8, 9, (1024, 1024)).float() for _ in range(5)]
        wd = w.cuda()
        step = libremote.capture_step(lambda x: x * 2 + wd, xs[0].cuda())
        out, results, spilled = None, [], []
        for x in xs:
            out = step(x.cuda())
            results.append(torch.equal(out.cpu(), x * 2 + w))
            filler = torch.ones(1024, 1024, device="cuda") * 3             # pushes the step's tensors out
            spilled.append(libremote.memory_stats()["spilled"] > 0)
            del filler
        print(json.dumps({"results": results, "spilled": spilled,
                          "restores": libremote.memory_stats()["device"]["restores"]}))
    """
    with pool_daemon("--device-memory", "8MiB", "--host-spill", "256MiB") as server:
        out = run_client(code, server.address)
    assert all(out["results"]), out
    assert any(out["spilled"]) and out["restores"] > 0, out


CAPTURED_TRAINING_CLIENT = """
    import hashlib, json, torch, libremote
    from torch import nn
    torch.manual_seed(0)
    width = 768
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(6)],
                          nn.Linear(width, 1)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
    x, y = torch.randn(64, width, device="cuda"), torch.randn(64, 1, device="cuda")
    def train(x, y):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=SET_TO_NONE); loss.backward(); opt.step()
        return loss
    first = train(x, y).item()
    step = libremote.capture_step(train, x, y)
    for _ in range(10):                  # replays queued back to back, one sync at the end
        loss = step(x, y)
    losses = [first, loss.item()]
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    print(json.dumps({"losses": losses, "params": digest, "allocated": libremote.memory_stats()["allocated"],
                      "evictions": libremote.memory_stats().get("device", {}).get("evictions", 0)}))
"""


@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads-kept", "grads-made-each-step"])
def test_captured_training_steps_through_spills_match_an_unconstrained_daemon(set_to_none):
    """Replays of a whole training step (forward, backward, capturable Adam) whose memory is twice
    the device budget: results spilled during a replay are brought back before the replay copies
    them into the step's outputs (it used to read a spilled storage and crash the daemon), and
    losses and parameters are bit-identical to the same program on a daemon with no budget. With
    ``set_to_none=True`` every replay makes the gradients anew: the last replay's gradients stay
    tracked (and may be spilled) until the new ones are copied into them."""
    client = CAPTURED_TRAINING_CLIENT.replace("SET_TO_NONE", str(set_to_none))
    with pool_daemon() as server:
        free = run_client(client, server.address)
    for factor in ((2.0,) if set_to_none else (1.5, 2.0)):  # (one factor is enough for the variant)
        budget = str(int(free["allocated"] / factor))
        with pool_daemon("--device-memory", budget, "--host-spill", "512MiB") as server:
            tight = run_client(client, server.address)
            assert "Traceback" not in server.log() and server.process.poll() is None, server.log()
        assert tight["evictions"] > 0, tight
        assert (tight["losses"], tight["params"]) == (free["losses"], free["params"]), factor
    assert free["losses"][1] < free["losses"][0], free   # it trains


def test_storages_freed_before_any_use_are_dropped_not_spilled():
    """Making room, the daemon first takes storages that queued commands free before anything
    reads them: their bytes are dropped with no copy to host RAM. A storage a live view still
    uses is not dead, and neither is one whose only other handle is a tensor moved onto it
    with ``set_`` (its handle count follows the move)."""
    code = """
        import json, torch, libremote
        MiB = 1 << 20
        stats = lambda: libremote.memory_stats()["device"]
        # 1. Dead: `a` is freed right after the op that needs its room.
        a = torch.full((MiB,), 1.0, device="cuda")   # 4 MiB each; the budget holds three
        b = torch.full((MiB,), 2.0, device="cuda")
        c = torch.full((MiB,), 3.0, device="cuda")
        torch.cuda.synchronize()
        before = stats()
        d = torch.full((MiB,), 4.0, device="cuda")   # one batch: this op, then the free of a
        del a
        total = (b.sum() + c.sum() + d.sum()).item()
        after = stats()
        dead = {k: after[k] - before[k] for k in ("discards", "bytes_discarded", "evictions")}
        # 2. Not dead: a view keeps b's storage, and x was moved onto y's storage with set_.
        x = torch.zeros(MiB, device="cuda")
        y = torch.full((MiB,), 5.0, device="cuda")
        x.set_(y)                                    # (x's own storage is released)
        g = torch.full((MiB,), 7.0, device="cuda")   # the budget is full again
        view = b[:16]
        torch.cuda.synchronize()
        before = stats()
        e = torch.full((MiB,), 6.0, device="cuda")   # needs room, with the frees of y and b queued
        del y, b
        s = torch.zeros(4, device="cuda")
        for _ in range(100):                         # the next reads of x and b's view come
            s = s + 1                                # beyond the daemon's lookahead
        alive = (x.sum() + view.sum() + e.sum() + g.sum() + s.sum()).item()
        after = stats()
        print(json.dumps({"total": total, "dead": dead, "alive": alive,
                          "bytes_discarded_after": after["bytes_discarded"] - before["bytes_discarded"],
                          "evictions_after": after["evictions"] - before["evictions"]}))
    """
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        out = run_client(code, server.address, LIBREMOTE_BATCH="1024")
        assert server.process.poll() is None, server.log()
    assert out["total"] == (2.0 + 3.0 + 4.0) * MiB, out
    assert out["dead"] == {"discards": 1, "bytes_discarded": 4 * MiB, "evictions": 0}, out
    assert out["alive"] == 5.0 * MiB + 2.0 * 16 + 6.0 * MiB + 7.0 * MiB + 4 * 100, out
    # Room for e came from spilling (y's storage and b's are live); what was dropped, if anything,
    # is a small temporary of the loop that the client had freed.
    assert out["evictions_after"] > 0 and out["bytes_discarded_after"] < MiB, out
