"""One pool across many daemons, coordinated through etcd (issue 21). Torch-free: the daemon's
front, the ``libremote`` command and the client's resolver all use it.

==================  =====================================================================
module              one job
==================  =====================================================================
``address``         ``etcd://h1:2379,h2:2379/pool``: the endpoints, the pool's name, the
                    credentials (user/password, TLS) from the environment
``etcd``            the etcd v3 JSON gateway through etcd3gw: ranges, transactions, leases,
                    watches, failing over between the endpoints
``records``         what the pool keeps in etcd (daemons, devices, reservations, waiters,
                    quotas) and under which keys
``placement``       pure: which daemon and devices a request gets (binpack, spread, pins)
``reserve``         placing with a transaction that cannot double-spend; claiming it
``queue``           the pool-wide queue's order and who may go next
==================  =====================================================================

There is no central scheduler: clients place themselves with etcd transactions, daemons are
peers that only register themselves and check the claims of arriving clients, and etcd is the
replicated store (3 or 5 members). Nothing else has to be up for a placement to succeed.
"""
