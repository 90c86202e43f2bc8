"""Every crafted file of the corpus is refused in one line, or loads as a valid state, in bounded memory and time.

The files go through ``read_info``, ``verify(deep=True)`` and
``load(expected=..., max_tokens=...)`` in a child process whose address space
is limited to 1.5 GB (as ``ulimit -v`` would), each call timed; the parent
checks what each entry point did against the file's expectation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from limited_child import run_limited

from hostile_corpus import DAMAGED, EXPECTATIONS, LOADS, REFUSED, UNLOADABLE, build_corpus

ADDRESS_SPACE = 1536 << 20
SECONDS_PER_CALL = 10.0

CHECK = """
    from kvstore import snapshot
    from kvstore.verify import verify
    from hostile_corpus import FINGERPRINT, MAX_CONTEXT

    def check(name, path):
        return {"info": attempt(lambda: snapshot.read_info(path)),
                "verify": attempt(lambda: verify(path, deep=True)),
                "load": attempt(lambda: snapshot.load(path, expected=FINGERPRINT, max_tokens=MAX_CONTEXT))}
"""

WANTED = {
    LOADS: {"info": "ok", "verify": "ok", "load": "ok"},
    REFUSED: {"info": "refused", "verify": "refused", "load": "refused"},
    DAMAGED: {"info": "ok", "verify": "refused", "load": "refused"},
    UNLOADABLE: {"info": "ok", "verify": "ok", "load": "refused"},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[tuple[str, Path, str]]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def results(corpus) -> dict:
    files, maxrss = run_limited(CHECK, [[name, str(path)] for name, path, _ in corpus],
                                address_space=ADDRESS_SPACE, seconds_per_call=SECONDS_PER_CALL, timeout=240)
    return {"files": files, "maxrss_kib": maxrss}


def test_the_corpus_covers_every_class(corpus):
    assert len(corpus) >= 80
    assert {expectation for _, _, expectation in corpus} == set(EXPECTATIONS)
    assert len({name for name, _, _ in corpus}) == len(corpus)


def test_every_file_is_refused_in_one_line_or_loads(corpus, results):
    problems = []
    for name, _, expectation in corpus:
        seen = results["files"][name]
        for api, wanted in WANTED[expectation].items():
            got = seen[api]
            if got["outcome"] != wanted:
                problems.append(f"{name}: {api} {got['outcome']}, expected {wanted}: {got['message']}")
            if "\n" in got["message"] or "Traceback" in got["message"]:
                problems.append(f"{name}: {api} message is not one line: {got['message']!r}")
            if got["seconds"] > SECONDS_PER_CALL:
                problems.append(f"{name}: {api} took {got['seconds']:.1f} s")
    assert not problems, "\n".join(problems)


def test_refusals_name_the_problem(results):
    def message(name: str, api: str = "load") -> str:
        return results["files"][name][api]["message"]

    assert "another model" in message("rle-bomb-2GiB-other-model")  # compared before any payload is decoded
    assert "a zstd bomb" in message("rle-bomb-exactly-declared-2GiB", "verify")
    assert "decompresses to more bytes" in message("zstd-bomb-above-declared-256MiB")
    assert "token id 1000000000 lies outside the vocabulary" in message("pending-id-1e9")
    assert "not the fingerprint's" in message("shapes-heads-contradict-fingerprint", "info")
    assert "more than the 8192 tokens" in message("transcript-4Mi-tokens")
    assert "checksum of layer 0 keys does not match" in message("flipped-payload-byte", "verify")
    assert "would expand 17 stored bytes to 3932160000" in message("declared-3.9GiB-payload", "verify")


def test_memory_stays_bounded(results):
    assert results["maxrss_kib"] * 1024 < 1.5e9
