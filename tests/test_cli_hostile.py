"""Every crafted file of the corpus through ``kvtrace info --deep``, ``prune`` and ``resume`` as a user runs them:
one line and exit code 2 for a refusal, no traceback, no escape sequence, bounded memory and time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostile_corpus import DAMAGED, LOADS, REFUSED, UNLOADABLE, build_corpus

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE = 3 << 30  # a safety net for the child (torch and transformers map a lot); RSS is what is checked
PEAK_RSS = 1.5e9
SECONDS_PER_CALL = 10

CHILD = textwrap.dedent("""
    import contextlib, io, json, resource, signal, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    sys.path.insert(0, {repo!r})
    from tui_app.cli import main

    def expired(signum, frame):
        raise TimeoutError("took too long")

    signal.signal(signal.SIGALRM, expired)

    def run(args):
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        signal.alarm({seconds})
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
        except BaseException as error:  # noqa: BLE001 - what is being looked for
            code, err = -1, io.StringIO(f"escaped: {{type(error).__name__}}: {{error}}")
        finally:
            signal.alarm(0)
        return {{"code": code, "out": out.getvalue(), "err": err.getvalue(), "seconds": time.perf_counter() - start}}

    for line in sys.stdin:
        name, path, out, model = json.loads(line)
        print(json.dumps({{"name": name,
            "info": run(["info", path, "--deep"]),
            "prune": run(["prune", path, "-o", out, "--keep-last", "4"]),
            "resume": run(["resume", path, "--model", model, "--steps", "1"]),
        }}), flush=True)
    print(json.dumps({{"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
""")

# exit code each command must give per class (None: 0 or 2, as long as a refusal is one line)
WANTED = {
    LOADS: {"info": 0, "prune": None, "resume": 0},
    REFUSED: {"info": 2, "prune": 2, "resume": 2},
    DAMAGED: {"info": 2, "prune": 2, "resume": 2},
    UNLOADABLE: {"info": 0, "prune": None, "resume": 2},
}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    from tracer.loading import load_model

    folder = tmp_path_factory.mktemp("cli-corpus")
    corpus = build_corpus(folder / "files", fingerprint=load_model(str(tiny_llama_dir)).fingerprint)
    child = CHILD.format(limit=ADDRESS_SPACE, repo=str(REPO), seconds=SECONDS_PER_CALL)
    feed = "".join(json.dumps([name, str(path), str(folder / f"{name}.out.kvs"), str(tiny_llama_dir)]) + "\n"
                   for name, path, _ in corpus)
    done = subprocess.run([sys.executable, "-c", child], input=feed, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return corpus, {line["name"]: line for line in lines[:-1]}, lines[-1]["maxrss_kib"]


def test_every_crafted_file_gets_one_line_or_works_through_the_cli(runs):
    corpus, results, _ = runs
    problems = []
    for name, _, expectation in corpus:
        for command, wanted in WANTED[expectation].items():
            run = results[name][command]
            shown = run["out"] + run["err"]
            errors = [line for line in run["err"].splitlines() if line.startswith("kvtrace: error: ")]
            if run["code"] not in ((0, 2) if wanted is None else (wanted,)):
                problems.append(f"{name}: {command} exited {run['code']}, expected {wanted}: {run['err'][-300:]}")
            elif run["code"] == 2 and len(errors) != 1:
                problems.append(f"{name}: {command} did not say one error line: {run['err'][-300:]!r}")
            if "Traceback" in shown or "\x1b" in shown:
                problems.append(f"{name}: {command} printed a traceback or an escape sequence")
            if run["seconds"] > SECONDS_PER_CALL:
                problems.append(f"{name}: {command} took {run['seconds']:.1f} s")
    assert not problems, "\n".join(problems)


def test_the_cli_stays_within_its_memory_bound(runs):
    assert runs[2] * 1024 < PEAK_RSS
