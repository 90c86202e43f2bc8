"""Crafted inputs through kvtrace in a child process, as the hostile-input tests need it.

The child's address space is limited (as ``ulimit -v`` would), every call is
timed and cut off by an alarm, and each outcome comes back as one JSON line:
an API call is "ok", "refused" (a ``SnapshotError``) or "crashed" (anything
else: the failure the tests look for); a command is its exit code and what it
printed. A test gives the per-item ``check`` function's source; the child runs
it for every item and reports its peak RSS last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import contextlib, io, json, resource, signal, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
sys.path[:0] = [{repo!r}, {tests!r}]
from kvstore.errors import SnapshotError


def _expired(signum, frame):
    raise TimeoutError("took too long")


signal.signal(signal.SIGALRM, _expired)


def attempt(call):
    start = time.perf_counter()
    signal.alarm({seconds})
    try:
        result = call()
        if hasattr(result, "validate"):
            result.validate()
        outcome, message = "ok", ""
    except SnapshotError as error:
        outcome, message = "refused", str(error)
    except BaseException as error:  # noqa: BLE001 - anything else is the failure being looked for
        outcome, message = "crashed", f"{{type(error).__name__}}: {{error}}"
    finally:
        signal.alarm(0)
    return {{"outcome": outcome, "message": message, "seconds": time.perf_counter() - start}}


def peak_rss_kib():
    # VmHWM is this process's own peak since exec; ru_maxrss also counts the parent's peak when the
    # child was spawned from a large process (Linux carries it over at exec), here pytest's
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def command(*args):
    from tui_app.cli import main

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    signal.alarm({seconds})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    except BaseException as error:  # noqa: BLE001 - what is being looked for
        code, err = -1, io.StringIO(f"escaped: {{type(error).__name__}}: {{error}}")
    finally:
        signal.alarm(0)
    return {{"code": code, "out": out.getvalue(), "err": err.getvalue(), "seconds": time.perf_counter() - start}}
"""

LOOP = """
for line in sys.stdin:
    item = json.loads(line)
    print(json.dumps({"name": item[0], **check(*item)}), flush=True)
print(json.dumps({"maxrss_kib": peak_rss_kib()}))
"""


def run_limited(check: str, items: list[list[str]], *, address_space: int, seconds_per_call: float,
                timeout: float) -> tuple[dict[str, dict], int]:
    """Run ``check`` (source of ``def check(name, *args) -> dict``) on each item (``[name, *args]``) in one
    limited child; returns each name's results and the child's peak RSS in KiB."""
    source = (PRELUDE.format(limit=address_space, repo=str(REPO), tests=str(REPO / "tests"),
                             seconds=max(1, round(seconds_per_call)))
              + textwrap.dedent(check) + LOOP)
    feed = "".join(json.dumps(item) + "\n" for item in items)
    done = subprocess.run([sys.executable, "-c", source], input=feed, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return {line["name"]: line for line in lines[:-1]}, lines[-1]["maxrss_kib"]
