"""The libremote daemon: serves a machine's accelerators to remote PyTorch clients.

Installed as the package ``libremote_server`` (``setup.py`` maps it to ``server/``); run it with
``libremote-server`` or ``python -m libremote_server``. Two kinds of process (docs/ARCHITECTURE.md):

- the **front** (front.py, admission.py, workers.py, broker.py, auth.py, policy.py): the network,
  admission, tenants, the device budget and status. It never imports torch nor runs a kernel;
- the **workers** (worker/): one process per tenant, forked from a zygote that imported torch,
  running that tenant's sessions only. The operating system keeps tenants apart.

The daemon imports nothing of the libremote client (the ``libremote`` package): its processes
see the real ``torch.cuda``.
"""
