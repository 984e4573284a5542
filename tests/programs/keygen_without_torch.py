"""Runs ``libremote keygen client research --dir DIR`` (libremote_wire.cli.main) in a process where
any import of torch fails; exits non-zero if the command fails.

Arguments: DIR.
"""

import sys

sys.modules["torch"] = None
from libremote_wire.cli import main

assert main(["keygen", "client", "research", "--dir", sys.argv[1]]) == 0
