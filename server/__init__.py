"""The libremote daemon: serves a machine's accelerators to remote PyTorch clients.

Installed as the package ``libremote.server`` (see ``setup.py``'s package_dir mapping); run it
with ``libremote-server`` or ``python -m libremote.server``. Importing it has no side effects;
creating a :class:`~libremote.server.daemon.Daemon` turns this process's client off (see there).
"""
