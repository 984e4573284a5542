"""The workers: the processes that run tenants' kernels (see loop.py), one per tenant.

Importing this package imports nothing else: the front imports :mod:`.zygote` (to start the
zygote and talk to it) without torch; everything else here is loaded in the zygote and its
children only.
"""
