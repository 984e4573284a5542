"""A client on this torch against a daemon on another torch version.

Ops travel by schema name with defaulted arguments dropped, so the two sides need not match.
Runs when LIBREMOTE_TEST_DAEMON_PYTHON names a Python whose torch differs from this one (with
pyzmq and msgpack), e.g. a venv with ``pip install torch==2.14.1 pyzmq msgpack numpy``.
"""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
import torch

from conftest import Daemon

OTHER_PYTHON = os.environ.get("LIBREMOTE_TEST_DAEMON_PYTHON")
pytestmark = pytest.mark.skipif(not OTHER_PYTHON, reason="set LIBREMOTE_TEST_DAEMON_PYTHON to a Python with another torch")


@pytest.fixture(scope="module")
def skewed():
    import libremote

    other_torch = subprocess.run([OTHER_PYTHON, "-c", "import torch; print(torch.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    assert other_torch != torch.__version__, "the daemon's torch must differ from the client's"
    server = Daemon(python=OTHER_PYTHON)
    info = libremote.connect(server.address)
    assert info["torch"] == other_torch
    yield libremote
    libremote.disconnect()
    server.stop()


def test_transformer_training_matches_local(skewed):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
    remote_layer = copy.deepcopy(layer).cuda()
    x = torch.randn(4, 16, 32)
    results = []
    for net, data in ((layer, x), (remote_layer, x.cuda())):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            loss = net(data).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results.append(losses)
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


def test_op_families_match_local(skewed):
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    torch.testing.assert_close((a.cuda() @ b.cuda()).cpu(), a @ b)
    torch.testing.assert_close(a.cuda().softmax(-1).cpu(), a.softmax(-1))
    mask = a > 0
    torch.testing.assert_close(a.cuda()[mask.cuda()].cpu(), a[mask])
    image = torch.randn(2, 3, 8, 8)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    torch.testing.assert_close(copy.deepcopy(conv).cuda()(image.cuda()).cpu(), conv(image), rtol=1e-4, atol=1e-5)
