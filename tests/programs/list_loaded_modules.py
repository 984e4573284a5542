"""Imports the modules named in its arguments and prints the name of every module then loaded,
one a line. With --block-torch first, any import of torch fails.

Arguments: [--block-torch] MODULE...
"""

import sys

names = sys.argv[1:]
if names[:1] == ["--block-torch"]:
    sys.modules['torch'] = None  # any import of torch fails
    names = names[1:]
for name in names:
    __import__(name)
print("\n".join(sys.modules))
