"""Copies tensors between cuda:0 and cuda:1, which are on two daemons, and checks the copies
against local torch: a 12 MiB tensor there and back (more than one PULL piece), with the bytes
each side counted; dtypes, transposed and sliced views, copy_ (also broadcasting), empty and
scalar tensors, factories given the other device's tensor, a large host index, explicit
generators, sparse tensors (which do not move between daemons); then a bare "cuda" after
set_device(1) and inside torch.cuda.device(0).

Prints a JSON report: "count", "names", "addresses" (the daemon of each device),
"client_bytes_during_copies", "exported_by_0", "pulled_by_1", "exported_by_1", "pulled_by_0",
"nbytes", "devices" (of the copies), "exact", "memory_allocated" and "facts" (per device),
"checks" (name: whether it matched local torch), "sparse_move" (the error moving a sparse
tensor), "bare_cuda" and "in_device_0".

Environment: LIBREMOTE_SERVER (two daemons: tcp://a,tcp://b).
"""

import json

import torch

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
