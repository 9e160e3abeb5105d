"""Run untrusted Python (generated programs) in a subprocess: time and memory limits, no network, a scratch dir.

What is enforced, layer by layer (docs/recipes/leti.md, "The sandbox", says the same):

kernel, always   rlimits set in the child before exec: RLIMIT_AS (address space, `memory_mb`), RLIMIT_CPU
                 (`cpu_s`; SIGXCPU, then SIGKILL a second later), RLIMIT_NOFILE (`max_files`), RLIMIT_FSIZE
                 (`max_file_mb`: Python ignores SIGXFSZ, so a write past it fails with "File too large"),
                 RLIMIT_CORE 0 (no core dumps). A wall-clock timeout kills the child's whole process group (it
                 runs in a new session). stdout/stderr go to files, so a program that prints forever is stopped
                 by RLIMIT_FSIZE, not by the parent's memory.
kernel, when     a new user + network namespace (unshare(CLONE_NEWUSER | CLONE_NEWNET)): the child sees only a
the host allows  loopback device that is down, so no packet leaves it, whatever code runs (ctypes, native
                 extensions, a spawned binary). `ExecResult.network_namespace` says whether it was in place;
                 `network_namespace="required"` refuses to run without it.
interpreter      `python -I -B` (isolated: no PYTHON* variables, no user site, no script dir on sys.path; no .pyc
                 writes) and an audit hook installed before the program is compiled, which cannot be removed:
                 it refuses socket creation and name resolution, process creation (subprocess, os.system,
                 exec*, spawn*, posix_spawn, fork) and writes outside the scratch dir (open for writing, remove,
                 rename, mkdir, rmdir, chmod, chown, link, symlink, truncate, utime, shutil.rmtree).
process          cwd = a fresh scratch dir (deleted afterwards, also HOME and TMPDIR); an environment built from
                 an allow-list (no proxies, tokens or credentials from the parent); stdin is the runner's only.

Not enforced: the audit hook is a Python-level policy, so native code (ctypes, C extensions, or
_posixsubprocess.fork_exec called directly) can get around it; reading files outside the scratch dir is allowed;
writes by native code outside the scratch dir are not blocked; without the network namespace, native code can
open sockets. This is defence in depth for model-written code, not a boundary against a determined attacker: run
it in a container or VM for that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource  # imported here: the preexec function must not import in the forked child
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import TokentuneError

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else None
_ENV_KEEP = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": "/usr/local/bin:/usr/bin:/bin",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SandboxLimits(BaseModel):
    """timeout_s          wall-clock limit; the process group is killed after it (LeTI's executor: 5 s)
    cpu_s              RLIMIT_CPU in seconds; None = ceil(timeout_s) + 1
    memory_mb          RLIMIT_AS, the address-space limit of the program
    max_files          RLIMIT_NOFILE
    max_file_mb        RLIMIT_FSIZE: the largest file the program may write (stdout and stderr included)
    network_namespace  auto: put the child in a new user + network namespace when the host allows it;
                       required: refuse to run without one; off: never (the audit hook still refuses sockets)
    workers            programs run at the same time by run_many
    tail_chars         characters kept from the end of stdout and stderr"""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(5.0, gt=0)
    cpu_s: int | None = Field(None, gt=0)
    memory_mb: int = Field(1024, ge=64)
    max_files: int = Field(128, ge=16)
    max_file_mb: int = Field(16, gt=0)
    network_namespace: Literal["auto", "required", "off"] = "auto"
    workers: int = Field(2, gt=0)
    tail_chars: int = Field(2000, gt=0)


@dataclass
class ExecResult:
    """status: passed (ran to the end), failed (an exception; error_type is its class), timeout (wall clock or
    CPU limit), killed (a signal: memory or file-size limit, or the program's own), exited (SystemExit or
    os._exit before the end: the tests after that point never ran)."""

    passed: bool
    status: Literal["passed", "failed", "timeout", "killed", "exited"]
    error_type: str | None
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    network_namespace: bool
    limits: dict

    @property
    def reason(self) -> str:
        """The failure as text: the traceback for an exception, a sentence for everything else ('' if passed)."""
        if self.status == "passed":
            return ""
        if self.status == "failed":
            return self.stderr_tail.strip() or f"{self.error_type}"
        if self.status == "timeout":
            return f"Timeout: the program did not finish within {self.limits['timeout_s']:g} seconds."
        if self.status == "exited":
            return f"The program exited with code {self.returncode} before it finished."
        return (f"The program was killed by {self.error_type} (limits: {self.limits['memory_mb']} MB of memory, "
                f"{self.limits['max_file_mb']} MB per file).")

    def to_dict(self) -> dict:
        return asdict(self)


def namespace_available() -> bool:
    """Whether this host lets an unprivileged child enter a new user + network namespace."""
    if _libc is None:
        return False

    def enter():
        if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            raise OSError("unshare failed")
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", ""], preexec_fn=enter, check=True, timeout=60,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


_NS_CACHE: dict[str, bool] = {}


def _use_namespace(mode: str) -> bool:
    if mode == "off":
        return False
    if "ok" not in _NS_CACHE:
        _NS_CACHE["ok"] = namespace_available()
    if mode == "required" and not _NS_CACHE["ok"]:
        raise TokentuneError("this host does not allow a new user + network namespace for the sandbox",
                             where="sandbox.network_namespace",
                             fix="use network_namespace: auto (the audit hook still refuses sockets), or enable "
                                 "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)")
    return _NS_CACHE["ok"]


def _preexec(limits: SandboxLimits, namespace: bool):
    cpu = limits.cpu_s or int(limits.timeout_s) + 1
    rl = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NOFILE, limits.max_files),
          (resource.RLIMIT_FSIZE, limits.max_file_mb << 20), (resource.RLIMIT_AS, limits.memory_mb << 20)]
    flags = _CLONE_NEWUSER | _CLONE_NEWNET

    def apply():  # runs in the forked child: no imports, nothing that allocates much; RLIMIT_AS goes last
        if namespace and _libc.unshare(flags) != 0:
            raise OSError("unshare(CLONE_NEWUSER | CLONE_NEWNET) failed")  # Popen raises SubprocessError
        for which, value in rl:
            hard = value + 1 if which == resource.RLIMIT_CPU else value  # SIGXCPU first, SIGKILL a second later
            resource.setrlimit(which, (value, hard))
    return apply


# Runs as `python -I -B -c BOOTSTRAP` in the scratch dir. It reads a nonce and a descriptor number from stdin,
# installs the audit hook, runs main.py, and writes `<nonce> ok|error <Type>|exit <code>` to that descriptor (a
# file outside the scratch dir): the parent only believes a run passed when that line says ok, so a program that
# calls os._exit(0) before its tests does not pass, and one that fills stdout cannot hide the verdict.
_BOOTSTRAP = r'''
import sys
def _sandbox():
    import linecache, os, traceback
    nonce, fd = sys.stdin.readline().split()
    write, fd, root = os.write, int(fd), os.path.realpath(os.getcwd())
    blocked = frozenset(("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "subprocess.Popen",
        "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "pty.spawn"))
    paths = {"os.remove": 1, "os.rename": 2, "os.mkdir": 1, "os.rmdir": 1, "os.chmod": 1, "os.chown": 1,
             "os.link": 2, "os.symlink": 2, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1}
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, join, getcwd, fspath, fsdecode = os.path.realpath, os.path.join, os.getcwd, os.fspath, os.fsdecode

    def inside(path):
        if isinstance(path, int):
            return True  # an open descriptor: it was checked when it was opened
        try:
            full = realpath(join(getcwd(), fsdecode(fspath(path))))
        except (OSError, TypeError, ValueError):
            return False
        return full == root or full.startswith(root + "/")

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            wants = bool((flags or 0) & writing) or any(c in (mode or "") for c in "wax+")
            if wants and not inside(path):
                raise PermissionError(f"sandbox: writing outside the scratch directory: {path!r}")
        elif event in paths:
            if not all(inside(p) for p in args[:paths[event]]):
                raise PermissionError(f"sandbox: {event} outside the scratch directory")
        elif event == "object.__setattr__" and args[0] is hook:
            raise PermissionError("sandbox: the audit hook cannot be changed")

    with open("main.py", encoding="utf-8") as fh:
        source = fh.read()
    linecache.cache["main.py"] = (len(source), None, source.splitlines(True), "main.py")
    sys.addaudithook(hook)

    def report(text):
        try:
            sys.stdout.flush()
        except Exception:
            pass
        write(fd, (nonce + " " + text + "\n").encode())

    namespace = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        report("exit %d" % code)
        os._exit(code)
    except BaseException as exc:
        try:
            top = te = traceback.TracebackException.from_exception(exc)
            seen = set()
            while te is not None and id(te) not in seen:  # drop this runner's frames (file "<string>")
                seen.add(id(te))
                te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != "<string>"])
                te = te.__cause__ or te.__context__
            sys.stderr.write("".join(top.format()))
            sys.stderr.flush()
        except BaseException:
            pass  # e.g. no memory left to format it: the error type below is still reported
        report("error " + type(exc).__name__)
        os._exit(1)
    report("ok")
    os._exit(0)
_sandbox()
'''


def _tail(path: Path, chars: int, scratch: str) -> str:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 4 * chars))
        text = fh.read().decode("utf-8", errors="replace")
    return text.replace(scratch + "/", "").replace(scratch, ".")[-chars:]


def _verdict(text: str, nonce: str) -> tuple[str, str | None]:
    for line in reversed(text.splitlines()):
        if line.startswith(nonce + " "):
            word, _, rest = line[len(nonce) + 1:].partition(" ")
            return word, rest or None
    return "", None


def _rmtree(path: str) -> None:
    def retry(func, p, _):  # a program may leave a directory without write permission
        os.chmod(os.path.dirname(p), 0o700)
        func(p)
    shutil.rmtree(path, onerror=retry)


def run_python(code: str, limits: SandboxLimits | None = None, *, scratch_root: str | None = None) -> ExecResult:
    """Run `code` as main.py in a fresh scratch dir under the sandbox; the dir is deleted afterwards."""
    limits = limits or SandboxLimits()
    namespace = _use_namespace(limits.network_namespace)
    root = tempfile.mkdtemp(prefix="tokentune-sandbox-", dir=scratch_root)
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    work = os.path.realpath(work)
    nonce = secrets.token_hex(16)
    try:
        Path(work, "main.py").write_text(code, encoding="utf-8")
        env = {**_ENV_KEEP, "HOME": work, "TMPDIR": work}
        out, err, verdict = Path(root, "stdout"), Path(root, "stderr"), Path(root, "verdict")
        start = time.monotonic()
        with open(out, "wb") as fo, open(err, "wb") as fe, open(verdict, "wb") as fv:
            proc = _popen([sys.executable, "-I", "-B", "-c", _BOOTSTRAP], cwd=work, env=env, stdin=subprocess.PIPE,
                          stdout=fo, stderr=fe, close_fds=True, pass_fds=(fv.fileno(),), start_new_session=True,
                          preexec_fn=_preexec(limits, namespace))
            timed_out = False
            try:
                proc.stdin.write(f"{nonce} {fv.fileno()}\n".encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also whatever the program left behind in its session
            proc.wait()
        duration = time.monotonic() - start
        stdout, stderr = _tail(out, limits.tail_chars, work), _tail(err, limits.tail_chars, work)
        word, detail = _verdict(_tail(verdict, 200, work), nonce)
    finally:
        _rmtree(root)
    rc = proc.returncode
    if timed_out:
        status, error = "timeout", "Timeout"
    elif word == "ok" and rc == 0:
        status, error = "passed", None
    elif word == "error":
        status, error = "failed", detail
    elif word == "" and rc is not None and rc < 0:  # a signal: the CPU limit, a file too large, a crash
        status, error = ("timeout", "CPUTimeLimit") if rc == -signal.SIGXCPU else ("killed", signal.Signals(-rc).name)
    else:  # SystemExit, os._exit, or the report line never written
        status, error = "exited", None
    return ExecResult(passed=status == "passed", status=status, error_type=error, returncode=rc,
                      stdout_tail=stdout, stderr_tail=stderr, duration_s=round(duration, 4),
                      network_namespace=namespace, limits=limits.model_dump())


def _popen(*args, **kwargs) -> subprocess.Popen:
    try:
        return subprocess.Popen(*args, **kwargs)
    except subprocess.SubprocessError as exc:  # the preexec function failed: the namespace could not be entered
        raise TokentuneError(f"the sandbox could not start its child: {exc}", where="sandbox.network_namespace",
                             fix="set network_namespace: off (the audit hook still refuses sockets)") from None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_many(codes: list[str], limits: SandboxLimits | None = None, *,
             scratch_root: str | None = None) -> list[ExecResult]:
    """run_python over many programs, `limits.workers` at a time; results in the order of `codes`."""
    limits = limits or SandboxLimits()
    _use_namespace(limits.network_namespace)  # decide once, before the threads start forking
    with ThreadPoolExecutor(max_workers=limits.workers) as pool:
        return list(pool.map(lambda c: run_python(c, limits, scratch_root=scratch_root), codes))
