"""The libremote client: remote tensors, the op path, and the ``cuda`` facade."""
