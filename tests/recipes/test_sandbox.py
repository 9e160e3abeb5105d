"""The sandbox: verdicts for correct, wrong, looping, memory-hungry, escaping and network-using programs."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from tokentune.errors import TokentuneError
from tokentune.recipes.sandbox import SandboxLimits, namespace_available, run_many, run_python

FAST = SandboxLimits(timeout_s=10, memory_mb=512)


def test_a_correct_solution_passes():
    r = run_python("def double(x):\n    return 2 * x\n\nassert double(21) == 42\nprint('done')\n", FAST)
    assert (r.passed, r.status, r.error_type, r.returncode) == (True, "passed", None, 0)
    assert r.stdout_tail.strip() == "done" and r.reason == ""


def test_a_wrong_solution_fails_with_its_traceback():
    code = "def double(x):\n    return x + 2\n\nassert double(21) == 42, 'double(21) is not 42'\n"
    r = run_python(code, FAST)
    assert (r.passed, r.status, r.error_type) == (False, "failed", "AssertionError")
    # The traceback names the program's own file and line, and nothing of the runner around it.
    assert 'File "main.py", line 4, in <module>' in r.reason
    assert r.reason.rstrip().endswith("AssertionError: double(21) is not 42")
    assert "<string>" not in r.reason and "tokentune-sandbox" not in r.reason


@pytest.mark.parametrize("code,error", [("1 / 0", "ZeroDivisionError"), ("def f(:\n  pass", "SyntaxError"),
                                        ("import no_such_module_xyz", "ModuleNotFoundError")])
def test_error_types(code, error):
    r = run_python(code, FAST)
    assert r.status == "failed" and r.error_type == error and error in r.reason


def test_infinite_loop_times_out_and_is_killed():
    r = run_python("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n",
                   SandboxLimits(timeout_s=1.0))
    assert (r.passed, r.status, r.error_type) == (False, "timeout", "Timeout")
    assert "did not finish within 1 seconds" in r.reason
    pid = int(r.stdout_tail.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_memory_bomb_is_stopped():
    r = run_python("chunks = [bytearray(1 << 30) for _ in range(16)]\nprint('allocated 16 GB')\n",
                   SandboxLimits(timeout_s=10, memory_mb=256))
    assert not r.passed and "allocated" not in r.stdout_tail
    assert (r.status, r.error_type) == ("failed", "MemoryError") or r.status == "killed"


def test_limits_are_set_in_the_child():
    limits = SandboxLimits(timeout_s=3, memory_mb=300, max_files=40, max_file_mb=2)
    code = ("import resource as r\nfor n in ('AS', 'CPU', 'NOFILE', 'FSIZE', 'CORE'):\n"
            "    print(n, *r.getrlimit(getattr(r, 'RLIMIT_' + n)))\n")
    lines = run_python(code, limits).stdout_tail.splitlines()
    got = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in lines}
    assert got == {"AS": (300 << 20, 300 << 20), "CPU": (4, 5), "NOFILE": (40, 40), "FSIZE": (2 << 20, 2 << 20),
                   "CORE": (0, 0)}


def test_writes_outside_the_scratch_dir_are_blocked_and_the_scratch_dir_is_removed(tmp_path):
    outside = tmp_path / "escape.txt"
    code = ("import os\nprint(os.getcwd().replace('/', '|'))\nopen('inside.txt', 'w').write('ok')\n"
            f"os.makedirs('a/b')\nopen({str(outside)!r}, 'w').write('x')\n")
    r = run_python(code, FAST)
    assert r.status == "failed" and r.error_type == "PermissionError"
    assert "writing outside the scratch directory" in r.reason
    assert not outside.exists()
    scratch = r.stdout_tail.split()[0].replace("|", "/")  # (paths under the scratch dir are shown relative)
    assert "tokentune-sandbox-" in scratch and not os.path.exists(scratch)
    for code in (f"import os\nos.remove({str(outside)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"open('a', 'w').close()\nimport os\nos.replace('a', {str(outside)!r})"):
        r = run_python(code, FAST)
        assert r.error_type == "PermissionError", code
    assert tmp_path.exists() and not outside.exists()


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(2.0)
    got = []
    thread = threading.Thread(target=lambda: _accept(server, got))
    thread.start()
    return server, thread, got


def _accept(server, got):
    try:
        got.append(server.accept())
    except OSError:
        pass


def test_socket_connect_is_refused():
    server, thread, got = _listener()
    port = server.getsockname()[1]
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", FAST)
    thread.join()
    server.close()
    assert r.error_type == "PermissionError" and "socket" in r.reason
    assert got == []  # the parent's server never saw a connection
    r = run_python("import socket\nsocket.getaddrinfo('localhost', 80)\n", FAST)
    assert r.error_type == "PermissionError"


@pytest.mark.skipif(not namespace_available(), reason="this host gives no unprivileged network namespace")
def test_network_namespace_stops_native_sockets_too():
    """ctypes gets around the audit hook; the empty network namespace still leaves it nowhere to connect."""
    server, thread, got = _listener()
    port = server.getsockname()[1]
    code = ("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
            f"addr = struct.pack('=H', 2) + struct.pack('!H4s8x', {port}, bytes([127, 0, 0, 1]))\n"
            "print('fd', fd, 'connect', libc.connect(fd, addr, len(addr)), 'errno', ctypes.get_errno())\n")
    r = run_python(code, SandboxLimits(timeout_s=10, network_namespace="required"))
    thread.join()
    server.close()
    assert r.network_namespace and r.passed  # the program itself runs: the connection is what fails
    words = r.stdout_tail.split()
    assert words[3] == "-1" and got == []
    r = run_python(code, SandboxLimits(timeout_s=10, network_namespace="off"))
    assert not r.network_namespace


def test_environment_is_stripped(monkeypatch):
    for key in ("HTTP_PROXY", "https_proxy", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "PYTHONPATH"):
        monkeypatch.setenv(key, "secret")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n", FAST)
    names, isolated = r.stdout_tail.splitlines()
    assert eval(names) == sorted(["HOME", "LANG", "LC_ALL", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                                  "OPENBLAS_NUM_THREADS", "PATH", "TMPDIR"])
    assert isolated == "1"


@pytest.mark.parametrize("code", ["import os\nos._exit(0)\nassert False", "import sys\nsys.exit(0)\nassert False"])
def test_leaving_before_the_tests_is_not_a_pass(code):
    r = run_python(code, FAST)
    assert not r.passed and r.status == "exited" and r.returncode == 0


def test_process_creation_is_blocked():
    r = run_python("import subprocess\nsubprocess.run(['true'])\n", FAST)
    assert r.error_type == "PermissionError" and "subprocess.Popen" in r.reason
    r = run_python("import os\nos.system('true')\n", FAST)
    assert r.error_type == "PermissionError"


def test_output_flood_is_cut_by_the_file_size_limit():
    r = run_python("while True:\n    print('x' * 1000)\n", SandboxLimits(timeout_s=20, max_file_mb=1))
    assert r.status == "failed" and r.error_type == "OSError" and "File too large" in r.reason
    assert len(r.stdout_tail) <= FAST.tail_chars


def test_run_many_keeps_order():
    results = run_many([f"assert {i} % 2 == 0" for i in range(6)], SandboxLimits(timeout_s=10, workers=3))
    assert [r.passed for r in results] == [True, False, True, False, True, False]


def test_required_namespace_fails_loudly_when_missing(monkeypatch):
    from tokentune.recipes import sandbox

    monkeypatch.setattr(sandbox, "_NS_CACHE", {"ok": False})
    with pytest.raises(TokentuneError, match="network namespace"):
        run_python("pass", SandboxLimits(network_namespace="required"))


def test_a_namespace_that_cannot_be_entered_is_a_clear_error(monkeypatch):
    from tokentune.recipes import sandbox

    class NoUnshare:
        def unshare(self, flags):
            return -1

    monkeypatch.setattr(sandbox, "_NS_CACHE", {"ok": True})
    monkeypatch.setattr(sandbox, "_libc", NoUnshare())
    with pytest.raises(TokentuneError, match="could not start its child"):
        run_python("pass", SandboxLimits(network_namespace="auto"))


def test_a_program_may_exit_with_any_code_after_its_tests():
    r = run_python("import sys\nsys.exit(97)\n", FAST)
    assert r.status == "exited" and r.returncode == 97
