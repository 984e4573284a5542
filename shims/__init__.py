"""Interception for programs that cannot be edited, installed as ``libremote.shims``.

* :mod:`libremote.shims.autostart`: ``LIBREMOTE_SERVER=tcp://host:port python program.py`` makes
  an unmodified PyTorch program use the remote GPU (activated by ``libremote-autostart.pth``).
"""
