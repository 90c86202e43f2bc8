"""Every crafted file of the corpus through ``kvtrace info --deep``, ``prune`` and ``resume`` as a user runs them:
one line and exit code 2 for a refusal, no traceback, no escape sequence, bounded memory and time."""

from __future__ import annotations

import pytest
from limited_child import run_limited

from hostile_corpus import DAMAGED, LOADS, REFUSED, UNLOADABLE, build_corpus

ADDRESS_SPACE = 3 << 30  # a safety net for the child (torch and transformers map a lot); RSS is what is checked
PEAK_RSS = 1.5e9
SECONDS_PER_CALL = 10

CHECK = """
    def check(name, path, out, model):
        return {"info": command("info", path, "--deep"),
                "prune": command("prune", path, "-o", out, "--keep-last", "4"),
                "resume": command("resume", path, "--model", model, "--steps", "1")}
"""

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
    items = [[name, str(path), str(folder / f"{name}.out.kvs"), str(tiny_llama_dir)] for name, path, _ in corpus]
    results, maxrss = run_limited(CHECK, items, address_space=ADDRESS_SPACE, seconds_per_call=SECONDS_PER_CALL,
                                  timeout=600)
    return corpus, results, maxrss


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
