"""Uses two devices of the pool: trains a small MLP on the CPU, on cuda:0 and on cuda:1, then with
nn.DataParallel over both, and copies and computes between the devices.

Prints a JSON report: the device count, each run's losses and the devices of its parameters and
gradients, DataParallel's losses and devices, the copies' results, the error for an op mixing
devices, and the device a bare "cuda" means after set_device(1).

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_DEVICES=2.
"""

import copy
import json

import torch

import libremote

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
