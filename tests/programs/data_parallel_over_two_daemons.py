"""Trains data parallel over cuda:0 and cuda:1 (on two daemons) and the same on local CPU: two
replicas, each a half of the batch, their gradients averaged with plain tensor ops (gathered onto
the first device and sent back) for three steps; then torch.nn.DataParallel over both devices
against the model alone on the CPU.

Prints {"remote": run, "local": run, "dp_remote": losses, "dp_local": losses}; a run is
{"losses", "weights" (each replica's parameters, as lists)}.

Environment: LIBREMOTE_SERVER (two daemons: tcp://a,tcp://b).
"""

import copy
import json

import torch


def run(devices):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    replicas = [copy.deepcopy(model).to(device) for device in devices]
    losses = []
    for _ in range(3):
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
