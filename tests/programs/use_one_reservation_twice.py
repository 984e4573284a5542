"""A client that gets one placement from the pool and opens two sessions with its reservation.

Prints {"refused": MESSAGE, "first": SESSION_ID}: the first session's id, and why the second was
refused (a reservation is good for one session).

Environment: LIBREMOTE_SERVER (the pool, etcd://...).
"""

import json
import os

import libremote
from libremote import pool
from libremote.client.session import ClientSession
from libremote.config import Settings
from libremote_wire import __version__

placed, = pool.resolve(os.environ["LIBREMOTE_SERVER"])
settings = Settings.from_env()
first = ClientSession(settings, placed.address, __version__, reservation=placed.reservation)
try:
    ClientSession(settings, placed.address, __version__, reservation=placed.reservation)
except libremote.ConnectionFailed as exc:
    print(json.dumps({"refused": str(exc), "first": first.session_id}))
first.close()
pool.release()
