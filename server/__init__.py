"""The libremote daemon: serves a machine's accelerators to remote PyTorch clients.

Installed as the package ``libremote.server`` (see ``setup.py``'s package_dir mapping); run it
with ``libremote-server`` or ``python -m libremote.server``.
"""

from libremote.client import activation as _activation

# Importing this package ran libremote/__init__.py, which points torch.cuda at a daemon: undo
# that here, the daemon drives the real devices.
_activation.deactivate()
