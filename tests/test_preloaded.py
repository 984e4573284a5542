"""The preloaded launcher (tests/preloaded.py) behaves, for the tests, as ``subprocess.Popen`` of
a fresh interpreter does: argv, working directory, environment, output, exit status, signals,
timeouts, and libremote activated at the program's first ``import torch``."""

from __future__ import annotations

import os
import signal
import subprocess

import preloaded
import pytest

from helpers import REPO, run_python, spawn_client, subprocess_env

SHOW = "import os, sys; print(sys.argv, os.getcwd(), os.environ.get('MARK'), sys.path[0] == ''); sys.exit(int(sys.argv[1]))"


def test_a_forked_program_sees_its_argv_cwd_and_environment_and_ends_with_its_status():
    result = run_python(SHOW, "3", "x", timeout=60, MARK="here")
    assert (result.returncode, result.stdout.strip()) == (3, f"['-c', '3', 'x'] {REPO} here True")
    client = spawn_client(SHOW, "tcp://127.0.0.1:9", "0")
    assert isinstance(client, preloaded.PreloadedPopen)
    assert client.communicate(timeout=60)[0].startswith("['-c', '0']")


def test_an_exception_goes_to_stderr_and_exits_1_like_python_does():
    result = run_python("import sys; print('out'); raise ValueError('boom')", timeout=60)
    assert result.returncode == 1
    assert result.stdout == "out\n"
    assert result.stderr.rstrip().endswith("ValueError: boom")


def test_a_script_runs_as_main_with_its_folder_first_on_the_path(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.path[0], sys.argv)\n")
    result = run_python(str(script), "a", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"__main__ {tmp_path} [{str(script)!r}, 'a']"


def test_kill_terminate_poll_and_timeouts_act_on_the_forked_process():
    client = _launched("import time; print('up', flush=True); time.sleep(100)")
    assert client.stdout.readline() == "up\n"
    assert client.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        client.wait(timeout=0.2)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == -signal.SIGTERM
    client.communicate()
    other = _launched("import time; time.sleep(100)")
    other.kill()
    assert other.wait(timeout=30) == -signal.SIGKILL
    other.communicate()


def test_forked_programs_get_their_own_random_streams():
    code = "import random, numpy; print(random.random(), numpy.random.random())"
    first, second = (run_python(code, timeout=60).stdout for _ in range(2))
    assert first != second


def test_libremote_activates_at_the_programs_first_import_torch(daemon):
    code = ("import os, sys; before = 'libremote' in sys.modules; import torch; "
            "print(before, 'libremote' in sys.modules, torch.cuda.is_available(), torch.ones(2, device='cuda').sum().item())")
    result = run_python(code, timeout=120, LIBREMOTE_SERVER=daemon.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False True True 2.0"


def test_an_environment_torch_reads_while_loading_gets_a_fresh_interpreter():
    base = subprocess_env()
    assert preloaded.needs_fresh_interpreter(base, {**base, "OMP_NUM_THREADS": "1"})
    assert not preloaded.needs_fresh_interpreter(base, {**base, "LIBREMOTE_SERVER": "tcp://127.0.0.1:1", "NAME": "a"})
    result = run_python("import os; print(os.environ['OMP_NUM_THREADS'], os.getppid())", timeout=60, OMP_NUM_THREADS="1")
    assert result.stdout.split() == ["1", str(os.getpid())]  # exec'd by this process itself


def _launched(code: str) -> subprocess.Popen:
    return spawn_client(code, "tcp://127.0.0.1:9")  # (never connects: no torch import)
