"""One program, devices on two daemons (issue 21, aggregation): ``LIBREMOTE_SERVER=tcp://a,tcp://b``.

cuda:0 is on the first daemon and cuda:1 on the second (libremote/client/servers.py). Tensors move
between them daemon to daemon (EXPORT/PULL, libremote/client/transfer.py and
server/worker/exports.py), and training that spans both gives exactly what local CPU torch gives.
The daemons run on the CPU backend, on loopback, started here; the clients run in subprocesses
(the device guard for two devices is chosen when libremote is imported).
"""

from __future__ import annotations

import pytest

from helpers import last_json, pool_daemon, run_python

CLIENT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def two_daemons():
    with pool_daemon() as first, pool_daemon() as second:
        yield first, second


def _run(code: str, first, second, **env: str) -> dict:
    result = run_python(code, timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=f"{first.address},{second.address}", **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return last_json(result.stdout)


COPIES = """
    import json, torch, libremote
    from libremote.client import runtime
    from libremote_wire.messages import Cmd

    def stats(index):
        return runtime.session_for(index).request([Cmd.QUERY, "stats"])[0]

    def client_bytes():
        return sum(s.connection.bytes_received + s.connection.bytes_sent for s in runtime.sessions())

    out = {"count": torch.cuda.device_count(), "names": [torch.cuda.get_device_name(i) for i in range(2)],
           "addresses": [runtime.session_for(i).address for i in range(2)]}
    torch.manual_seed(0)
    host = torch.randn(3 << 20)  # 12 MiB: more than one PULL piece (8 MiB)
    a = host.to("cuda:0")
    torch.cuda.synchronize()
    before, exported, pulled = client_bytes(), stats(0)["bytes_exported"], stats(1)["bytes_pulled"]
    b = a.to("cuda:1")
    c = (b * 2).to("cuda:0")  # and back
    torch.cuda.synchronize()
    out["client_bytes_during_copies"] = client_bytes() - before
    out["exported_by_0"] = stats(0)["bytes_exported"] - exported
    out["pulled_by_1"] = stats(1)["bytes_pulled"] - pulled
    out["exported_by_1"] = stats(1)["bytes_exported"]
    out["pulled_by_0"] = stats(0)["bytes_pulled"]
    out["nbytes"] = host.nbytes
    out["devices"] = [str(b.device), str(c.device)]
    out["exact"] = torch.equal(b.cpu(), host) and torch.equal(c.cpu(), host * 2)
    out["memory_allocated"] = [torch.cuda.memory_allocated(i) for i in range(2)]
    out["facts"] = [[torch.cuda.get_device_properties(i).total_memory > 0, torch.cuda.mem_get_info(i)[1] > 0,
                     torch.cuda.memory_stats(i)["allocated_bytes.all.current"] == out["memory_allocated"][i]]
                    for i in range(2)]
    # dtypes, layouts and copy_ across daemons, against local torch
    checks = {}
    for dtype in (torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.complex64):
        value = (torch.randn(7, 5) * 100).to(dtype)
        checks[str(dtype)] = torch.equal(value.to("cuda:1").to("cuda:0").cpu(), value)
    square = torch.randn(6, 4)
    moved_t = square.to("cuda:0").t().to("cuda:1")
    checks["transposed_strides"] = moved_t.stride() == square.t().stride()
    checks["transposed"] = torch.equal(moved_t.cpu(), square.t())
    checks["slice"] = torch.equal(square.to("cuda:0")[1:, 2:].to("cuda:1").cpu(), square[1:, 2:])
    checks["to_with_dtype"] = torch.equal(square.to("cuda:0").to("cuda:1", torch.float64).cpu(), square.double())
    into = torch.zeros(4, 6, dtype=torch.float64, device="cuda:1")
    into.copy_(square.to("cuda:0").t())
    checks["copy_"] = torch.equal(into.cpu(), square.t().double())
    broadcast = torch.zeros(3, 4, device="cuda:0")
    broadcast.copy_(torch.arange(4.0, device="cuda:1"))
    checks["copy_broadcast"] = torch.equal(broadcast.cpu(), torch.arange(4.0).expand(3, 4))
    checks["empty"] = torch.empty(0, 3, device="cuda:0").to("cuda:1").shape == (0, 3)
    checks["scalar"] = torch.tensor(2.5, device="cuda:0").to("cuda:1").item() == 2.5
    # factories that take another device's tensor for its metadata only
    on_first = torch.ones(2, 3, device="cuda:0")
    like = [torch.zeros_like(on_first, device="cuda:1"), torch.full_like(on_first, 2.0, device="cuda:1"),
            on_first.new_ones(4, device="cuda:1")]
    checks["like"] = [str(t.device) for t in like] == ["cuda:1"] * 3 and torch.equal(like[1].cpu(), torch.full((2, 3), 2.0))
    # a large host index tensor in a device op (uploaded first, to the op's daemon)
    table, rows = torch.randn(50000, 2), torch.randint(0, 50000, (20000,))
    checks["host_index"] = torch.equal(table.to("cuda:1")[rows].cpu(), table[rows])
    # an explicit generator lives on its device's daemon
    draws = [torch.randn(5, device=f"cuda:{i}", generator=torch.Generator(f"cuda:{i}").manual_seed(3)).cpu()
             for i in range(2)]
    checks["generators"] = torch.equal(draws[0], draws[1])
    # sparse tensors work on the second daemon's device, and say clearly that they do not move
    host_sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [2, 0, 1]]), torch.tensor([1., 2., 3.]), (3, 3))
    dense = torch.randn(3, 2)
    on_second = host_sparse.to("cuda:1")
    checks["sparse_mm"] = torch.equal(torch.sparse.mm(on_second, dense.to("cuda:1")).cpu(), torch.sparse.mm(host_sparse, dense))
    try:
        on_second.to("cuda:0")
        out["sparse_move"] = None
    except RuntimeError as exc:
        out["sparse_move"] = str(exc)
    out["checks"] = checks
    # the current device chooses the daemon of a bare "cuda" and of torch.cuda's answers
    torch.cuda.set_device(1)
    out["bare_cuda"] = str(torch.ones(1, device="cuda").device)
    with torch.cuda.device(0):
        out["in_device_0"] = str(torch.ones(1, device="cuda").device)
    print(json.dumps(out))
"""


def test_a_cross_server_copy_is_exact_and_goes_daemon_to_daemon(two_daemons):
    first, second = two_daemons
    out = _run(COPIES, first, second)
    assert out["count"] == 2 and len(out["names"]) == 2, out
    assert out["addresses"] == [first.address, second.address], out
    assert out["devices"] == ["cuda:1", "cuda:0"] and out["exact"], out
    nbytes = out["nbytes"]
    # The bytes went worker to worker: each daemon's session counted them...
    assert out["exported_by_0"] == nbytes and out["pulled_by_1"] == nbytes, out
    assert out["exported_by_1"] >= nbytes and out["pulled_by_0"] >= nbytes, out
    # ...and the client sent and received only commands, tokens and acknowledgements.
    assert out["client_bytes_during_copies"] < 16 << 10, out
    assert all(out["checks"].values()), out["checks"]
    assert out["sparse_move"] and "cannot move between daemons" in out["sparse_move"], out
    assert out["memory_allocated"][0] >= nbytes and out["memory_allocated"][1] >= nbytes, out
    assert out["facts"] == [[True, True, True], [True, True, True]], out
    assert out["bare_cuda"] == "cuda:1" and out["in_device_0"] == "cuda:0", out


DATA_PARALLEL = """
    import copy, json, torch, libremote

    def run(devices):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        replicas = [copy.deepcopy(model).to(device) for device in devices]
        losses = []
        for step in range(3):
            for replica in replicas:
                replica.zero_grad()
            shard_losses = []
            for index, (replica, device) in enumerate(zip(replicas, devices)):
                xs, ys = x[index * 16:(index + 1) * 16].to(device), y[index * 16:(index + 1) * 16].to(device)
                loss = torch.nn.functional.mse_loss(replica(xs), ys)
                loss.backward()
                shard_losses.append(loss.detach())
            # all-reduce with plain tensor ops: gather onto the first device, average, send back
            with torch.no_grad():
                for params in zip(*(replica.parameters() for replica in replicas)):
                    mean = (params[0].grad + params[1].grad.to(devices[0])) / 2
                    for param in params:
                        param.grad.copy_(mean.to(param.device))
                        param.sub_(0.1 * param.grad)
            losses.append(((shard_losses[0] + shard_losses[1].to(devices[0])) / 2).item())
        weights = [[p.detach().cpu().tolist() for p in replica.parameters()] for replica in replicas]
        return {"losses": losses, "weights": weights}

    def data_parallel(device_ids):
        # nn.DataParallel: scatter, replicate, parallel apply, gather, grads reduced onto the first
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        first = "cpu" if device_ids is None else "cuda:0"
        net = model.to(first) if device_ids is None else torch.nn.DataParallel(model.to(first), device_ids=device_ids)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(net(x.to(first)), y.to(first))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    print(json.dumps({"remote": run(["cuda:0", "cuda:1"]), "local": run(["cpu", "cpu"]),
                      "dp_remote": data_parallel([0, 1]), "dp_local": data_parallel(None)}))
"""


def test_a_data_parallel_step_across_two_daemons_equals_local_cpu(two_daemons):
    out = _run(DATA_PARALLEL, *two_daemons)
    assert out["remote"]["losses"] == out["local"]["losses"], out
    assert out["remote"]["weights"] == out["local"]["weights"], "weights differ from local CPU torch"
    assert out["remote"]["weights"][0] == out["remote"]["weights"][1], "the replicas drifted apart"
    # (torch's DataParallel sums the replicas' gradients in another order than one device would)
    assert out["dp_remote"] == pytest.approx(out["dp_local"], rel=1e-5), out


PIPELINE = """
    import json, torch, libremote

    def run(first, second):
        torch.manual_seed(0)
        stage1 = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU())
        stage2 = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        stage1.to(first)
        stage2.to(second)
        optimizer = torch.optim.SGD([*stage1.parameters(), *stage2.parameters()], lr=0.05, momentum=0.9)
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        losses = []
        for step in range(4):
            hidden = stage1(x.to(first))
            prediction = stage2(hidden.to(second))  # forward across daemons; backward comes back
            loss = torch.nn.functional.mse_loss(prediction, y.to(second))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"losses": losses, "grad_devices": [str(p.grad.device) for p in (stage1[0].weight, stage2[0].weight)],
                "weights": [p.detach().cpu().tolist() for p in (*stage1.parameters(), *stage2.parameters())]}

    print(json.dumps({"remote": run("cuda:0", "cuda:1"), "local": run("cpu", "cpu")}))
"""


def test_a_pipeline_split_across_two_daemons_equals_local_cpu(two_daemons):
    out = _run(PIPELINE, *two_daemons)
    assert out["remote"]["grad_devices"] == ["cuda:0", "cuda:1"], out
    assert out["remote"]["losses"] == out["local"]["losses"], out
    assert out["remote"]["weights"] == out["local"]["weights"], "weights differ from local CPU torch"


COMPILED = """
    import copy, json, torch, libremote
    from libremote.client import runtime
    from libremote_wire.messages import Cmd
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x, y = torch.randn(4, 8), torch.randn(4, 1)

    def train(net, device):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(net(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    out = {"local": train(copy.deepcopy(model), "cpu")}
    compiled = torch.compile(copy.deepcopy(model).to("cuda:1"))  # the current device stays cuda:0
    out["remote"] = train(compiled, "cuda:1")
    out["compiles"] = compiled.compiles
    out["graph_runs"] = [runtime.session_for(i).request([Cmd.QUERY, "stats"])[0]["graph_runs"] for i in range(2)]

    # a whole step captured on cuda:1 (libremote.capture_step) replays on its daemon
    local = copy.deepcopy(model)
    captured = copy.deepcopy(model).to("cuda:1")
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (local, captured)]

    def train_step(xb, yb):
        loss = torch.nn.functional.mse_loss(captured(xb), yb)
        optimizers[1].zero_grad(set_to_none=False)
        loss.backward()
        optimizers[1].step()
        return loss.detach()

    step = libremote.capture_step(train_step, x.to("cuda:1"), y.to("cuda:1"))  # runs it twice
    local_losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(local(x), y)
        optimizers[0].zero_grad()
        loss.backward()
        optimizers[0].step()
        local_losses.append(loss.item())
    out["captured"] = [step(x.to("cuda:1"), y.to("cuda:1")).item() for _ in range(3)]
    out["captured_local"] = local_losses[2:]
    try:
        libremote.capture_step(lambda v: (v * 2).to("cuda:0"), x.to("cuda:1"))
        out["capture_across"] = None
    except libremote.CaptureError as exc:
        out["capture_across"] = str(exc)
    print(json.dumps(out))
"""


def test_graph_mode_and_captured_steps_run_on_the_daemon_of_their_inputs(two_daemons):
    out = _run(COMPILED, *two_daemons)
    assert out["remote"] == out["local"] and out["compiles"] == 1, out
    assert out["graph_runs"][0] == 0 and out["graph_runs"][1] >= 6, out  # forward and backward, 3 steps
    assert out["captured"] == pytest.approx(out["captured_local"], rel=1e-6), out
    assert out["capture_across"] and "cannot move a tensor between daemons" in out["capture_across"], out


MIXED = """
    import json, torch, libremote
    a, b = torch.ones(3, device="cuda:0"), torch.ones(3, device="cuda:1")
    errors = {}
    for name, call in {"add": lambda: a + b, "matmul": lambda: a @ b, "cat": lambda: torch.cat([a, b]),
                       "add_": lambda: a.add_(b), "where": lambda: torch.where(a > 0, a, b)}.items():
        try:
            call()
            errors[name] = None
        except Exception as exc:
            errors[name] = [type(exc).__name__, str(exc)]
    errors["a_still_works"] = (a * 2).sum().item() == 6.0
    # closing closes every daemon's session; connecting again opens both
    from libremote.client import runtime
    opened = runtime.sessions()
    libremote.disconnect()
    errors["all_closed"] = len(opened) == 2 and all(session.closed for session in opened) and runtime.sessions() == []
    libremote.connect()
    errors["reopened"] = [len(runtime.sessions()), torch.cuda.device_count(),
                          (torch.ones(2, device="cuda:1").to("cuda:0") * 2).sum().item()]
    try:
        b + 1
        errors["old_tensor"] = None
    except RuntimeError as exc:
        errors["old_tensor"] = str(exc)
    print(json.dumps(errors))
"""


def test_an_op_mixing_devices_of_two_daemons_raises_cudas_error_and_closing_closes_all(two_daemons):
    out = _run(MIXED, *two_daemons)
    for name in ("add", "matmul", "cat", "add_", "where"):
        assert out[name] is not None, (name, out)
        kind, message = out[name]
        assert kind == "RuntimeError", (name, out)
        # what local CUDA says for tensors on two devices
        assert message.startswith("Expected all tensors to be on the same device, but found at least two devices"), (name, message)
        assert "cuda:0" in message and "cuda:1" in message, (name, message)
    assert out["a_still_works"], out
    assert out["all_closed"] and out["reopened"] == [2, 2, 4.0], out
    assert out["old_tensor"] and "earlier session" in out["old_tensor"], out


PULLS = """
    import json, os, torch, zmq, libremote
    from libremote.client import runtime
    from libremote_wire import codec, torch_codec
    from libremote_wire.messages import Cmd, Msg
    out = {}
    source = runtime.session_for(0)
    value = torch.arange(10, dtype=torch.int32, device="cuda:0")
    (token, nbytes), _ = source.request([Cmd.EXPORT, value._ref.id])
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.connect(source.connection.worker_address)

    def pull(token, offset=0, length=nbytes):
        peer.send(codec.packb([Msg.PULL, token, offset, length]))
        assert peer.poll(10000)
        frames = peer.recv_multipart()
        return codec.unpackb(frames[0]), frames[1:]

    out["wrong_token"] = pull(os.urandom(32))[0]
    out["too_far"] = pull(token, 0, nbytes + 4)[0]
    header, frames = pull(token)
    out["first"] = [header, torch.frombuffer(bytearray(frames[0]), dtype=torch.int32).tolist()]
    out["again"] = pull(token)[0]  # served once
    # a PULL may name only tcp:// peers (never this daemon's ipc:// sockets)
    target = runtime.session_for(1)
    handle = target.new_handle()
    target.submit([Cmd.PULL, handle, torch_codec.dtype_ext(torch.int32), [10], 0, "ipc:///tmp/anything", os.urandom(32), 40])
    try:
        target.synchronize()
        out["ipc"] = None
    except Exception as exc:
        out["ipc"] = str(exc)
    # a peer that is not there fails the copy at once (not after the 30 s a piece may take)
    import socket, time
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    target.submit([Cmd.PULL, target.new_handle(), torch_codec.dtype_ext(torch.int32), [10], 0, closed, os.urandom(32), 40])
    try:
        target.synchronize()
        out["gone"] = None
    except Exception as exc:
        out["gone"] = [str(exc), time.monotonic() - started]
    print(json.dumps(out, default=str))
"""


def test_exports_are_served_once_and_only_with_their_token(two_daemons):
    out = _run(PULLS, *two_daemons)
    pulled, total, error = out["wrong_token"][1:]
    assert total == 0 and "no such export" in error, out
    assert "not a piece" in out["too_far"][3], out
    assert out["first"][0] == [12, 0, 40], out  # [PULLED, offset, total], no error
    assert out["first"][1] == list(range(10)), out
    assert "no such export" in out["again"][3], out
    assert out["ipc"] and "tcp://host:port" in out["ipc"], out
    assert out["gone"] and "is gone" in out["gone"][0] and out["gone"][1] < 10, out


def test_exports_are_bounded_expire_and_end_with_their_session(monkeypatch):
    import torch

    from libremote_server.worker import exports as exports_module
    from libremote_wire import messages

    table = exports_module.Exports()
    token, nbytes = table.add("s1", torch.arange(6, dtype=torch.float32).reshape(2, 3).t())
    assert nbytes == 24 and len(token) == messages.EXPORT_TOKEN_BYTES
    total, piece, error = table.serve(token, 0, 24)
    assert error is None and total == 24
    assert torch.frombuffer(bytearray(piece), dtype=torch.float32).tolist() == [0, 3, 1, 4, 2, 5]  # logical order
    other, _ = table.add("s2", torch.ones(3))
    table.drop_session("s2")
    assert table.serve(other, 0, 12)[2] is not None
    monkeypatch.setattr(messages, "MAX_EXPORTS", 2)
    table.add("s3", torch.ones(1))
    table.add("s3", torch.ones(1))
    with pytest.raises(exports_module.ExportRefused, match="at most 2"):
        table.add("s3", torch.ones(1))
    monkeypatch.setattr(messages, "MAX_EXPORT_BYTES", 100)
    with pytest.raises(exports_module.ExportRefused, match="at most 100"):
        table.add("s4", torch.ones(100))
    late, _ = table.add("s4", torch.ones(1))
    monkeypatch.setattr(exports_module.time, "monotonic", lambda: 1e12)
    assert "no such export" in table.serve(late, 0, 4)[2]
    table.expire()
    assert table.held_bytes() == 0
    refusing = exports_module.Exports(allowed=False, why_not="CURVE")
    with pytest.raises(exports_module.ExportRefused, match="CURVE"):
        refusing.add("s", torch.ones(1))


KILLED = """
    import json, os, signal, torch, libremote
    from libremote.client import runtime
    out = {}
    a = torch.randn(4, 4, device="cuda:0")
    b = a.to("cuda:1")
    out["before"] = (b @ b).sum().item() == (a @ a).sum().item()
    second = runtime.session_for(1)
    os.kill(int(os.environ["SECOND_DAEMON_PID"]), signal.SIGKILL)
    os.kill(second.daemon_info["pid"], signal.SIGKILL)  # its worker
    try:
        for _ in range(3):
            (b * 2).sum().item()
        out["error"] = None
    except libremote.ConnectionFailed as exc:
        out["error"] = [type(exc).__name__, str(exc)]
    try:
        a.to("cuda:1")
        out["move_error"] = None
    except libremote.ConnectionFailed as exc:
        out["move_error"] = str(exc)
    out["first_still_works"] = (a * 2).sum().item() == a.sum().item() * 2
    out["is_connected"] = libremote.is_connected()
    print(json.dumps(out))
"""


def test_a_killed_daemon_gives_an_error_naming_it():
    with pool_daemon() as first, pool_daemon() as second:
        out = _run(KILLED, first, second, SECOND_DAEMON_PID=str(second.process.pid))
    assert out["before"], out
    assert out["error"] is not None, out
    kind, message = out["error"]
    assert second.address in message and first.address not in message, message
    assert out["move_error"] and second.address in out["move_error"], out
    assert out["first_still_works"], out
    assert out["is_connected"] is False, out  # (one of its daemons is gone)


def test_addresses_and_devices_must_agree(two_daemons):
    first, second = two_daemons
    code = """
        import json, torch, libremote
        try:
            torch.ones(1, device="cuda:0")
            print(json.dumps({"error": None}))
        except libremote.NotConfiguredError as exc:
            print(json.dumps({"error": str(exc)}))
    """
    out = _run(code, first, second, LIBREMOTE_DEVICES="3")
    assert out["error"] and "LIBREMOTE_DEVICES=3" in out["error"] and "2 daemons" in out["error"], out
    connect = f"""
        import json, torch, libremote
        info = libremote.connect("{first.address}, {second.address}")
        x = torch.ones(2, device="cuda:1") * 3
        print(json.dumps({{"count": torch.cuda.device_count(), "value": x.to("cuda:0").cpu().tolist()}}))
    """
    result = run_python(connect, timeout=CLIENT_TIMEOUT_S, LIBREMOTE_DEVICES="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_json(result.stdout) == {"count": 2, "value": [3.0, 3.0]}



PINNED = """
    import json, os, torch, libremote
    from libremote.client import runtime
    from libremote_wire.cli import query_status
    x = torch.arange(6.0, device="cuda:0")
    y = (x.to("cuda:1") + 1).to("cuda:2")
    out = {"value": y.cpu().tolist(), "count": torch.cuda.device_count(), "sessions": len(runtime.sessions())}
    for name in ("FIRST", "SECOND"):
        report = query_status(os.environ[name])
        out[name] = [row["devices"] for row in report["sessions"] if row.get("pid") == os.getpid()]
    print(json.dumps(out))
"""


def test_entries_can_pin_a_device_of_their_daemon():
    with pool_daemon("--loopback-admin", device="cpu,cpu") as first, \
            pool_daemon("--loopback-admin", device="cpu,cpu") as second:
        servers = f"{first.address}#1,{second.address}#1,{second.address}#0"
        result = run_python(PINNED, timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=servers,
                            FIRST=first.address, SECOND=second.address)
        assert result.returncode == 0, result.stderr[-3000:]
        out = last_json(result.stdout)
        assert out["value"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and out["count"] == 3 and out["sessions"] == 2, out
        assert out["FIRST"] == [[1]] and out["SECOND"] == [[1, 0]], out  # the daemons' own numbers, in order
        refused = run_python("import torch, libremote\ntorch.ones(1, device='cuda:0')", timeout=CLIENT_TIMEOUT_S,
                             LIBREMOTE_SERVER=f"{first.address}#5,{second.address}#0")
        assert refused.returncode != 0 and "device_indices [5]" in refused.stderr and first.address in refused.stderr, \
            refused.stderr[-2000:]


def test_an_unreachable_daemon_is_named_and_the_others_are_closed():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    code = """
        import json, os, time, torch, libremote
        from libremote_wire.cli import query_status
        try:
            torch.ones(1, device="cuda:0")
            error = None
        except libremote.ConnectionFailed as exc:
            error = str(exc)
        for _ in range(50):  # (the first daemon's session, opened before, was closed: BYE)
            mine = [row for row in query_status(os.environ["FIRST"])["sessions"] if row.get("pid") == os.getpid()]
            if not mine:
                break
            time.sleep(0.1)
        print(json.dumps({"error": error, "left_open": mine}))
    """
    with pool_daemon("--loopback-admin") as first:
        result = run_python(code, timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=f"{first.address},{nobody}",
                            LIBREMOTE_TIMEOUT="2", FIRST=first.address)
        assert result.returncode == 0, result.stderr[-3000:]
        out = last_json(result.stdout)
        assert out["error"] and nobody in out["error"] and "one of the 2 daemons" in out["error"], out
        assert out["left_open"] == [], out


def test_an_unmodified_pipeline_script_runs_across_two_daemons(two_daemons):
    """examples/pipeline_two_servers.py has no libremote in it: LIBREMOTE_SERVER opts it in."""
    from helpers import REPO, run_python

    first, second = two_daemons
    script = str(REPO / "examples" / "pipeline_two_servers.py")
    remote = run_python(script, timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=f"{first.address},{second.address}")
    local = run_python(script, timeout=CLIENT_TIMEOUT_S)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr[-3000:] + local.stderr[-3000:]
    assert remote.stdout.startswith("stage 1 on libremote"), remote.stdout
    losses = [line for line in remote.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 5 and losses == [line for line in local.stdout.splitlines() if line.startswith("step")]
