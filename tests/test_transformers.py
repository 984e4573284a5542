"""A real third-party library, unmodified: Hugging Face transformers' GPT-2 on the daemon's device.

examples/hf_gpt2_train_generate.py trains a tiny GPT-2 with tied embeddings (optimizer created
before ``model.to("cuda")``) and decodes greedily. It runs as an unmodified program with
``LIBREMOTE_SERVER`` set, and the same code runs here on local CPU torch: the losses, trained
parameters and generated ids must agree.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers  # noqa: F401  (required by requirements-dev.txt: a missing one fails here, not skips)

from conftest import REPO
from helpers import run_python

PROGRAM = REPO / "examples" / "hf_gpt2_train_generate.py"


def load_program():
    spec = importlib.util.spec_from_file_location("hf_gpt2_train_generate", PROGRAM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpt2_trains_and_generates_as_on_local_torch(daemon, tmp_path):
    saved = tmp_path / "parameters.pt"
    result = run_python(str(PROGRAM), str(saved), timeout=300, LIBREMOTE_SERVER=daemon.address)
    assert result.returncode == 0, result.stderr
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    local, local_parameters = load_program().run("cpu")
    assert remote["device"] == "cuda:0" and local["device"] == "cpu"
    assert remote["tied"] and local["tied"]
    assert local["losses"][-1] < local["losses"][0]
    assert remote["losses"] == pytest.approx(local["losses"], rel=1e-4, abs=1e-5)
    remote_parameters = torch.load(saved)
    assert remote_parameters.keys() == local_parameters.keys()
    for name, value in local_parameters.items():
        torch.testing.assert_close(remote_parameters[name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert remote["generated"] == local["generated"]
