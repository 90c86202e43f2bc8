"""``kvtrace save | resume | prune | info | import`` as a user runs them: in subprocesses."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from kvstore import snapshot
from kvstore_resume_checks import check_api_resume, check_command_resume, kvtrace, uninterrupted
from tracer.loading import load_model
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession

PROMPT = "Tell me a story."
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm. Use at least 400 words."


def kvtrace_here(capsys, *args: object) -> subprocess.CompletedProcess:
    """The same command in this process (cheaper: no interpreter start, no re-import of torch)."""
    from tui_app.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kvtrace: error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_save_then_resume_equals_the_uninterrupted_run(tiny_gpt2_dir, tmp_path):
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    reference = uninterrupted(loaded, PROMPT, 2 + 100)
    check_command_resume(loaded, str(tiny_gpt2_dir), tmp_path, PROMPT, reference, before=2)


@pytest.mark.slow
def test_smollm2_resumes_exactly_through_the_api_and_the_commands(smollm2, tmp_path):
    """One uninterrupted SmolLM2 run of 104 tokens is the reference for both paths."""
    reference = uninterrupted(smollm2, LONG_PROMPT, 4 + 100)
    check_api_resume(smollm2, tmp_path, LONG_PROMPT, reference, before=4)
    check_command_resume(smollm2, None, tmp_path, LONG_PROMPT, reference, before=4)


def test_info_and_prune(tiny_llama_dir, tmp_path):
    saved, pruned = tmp_path / "s.kvs", tmp_path / "p.kvs"
    assert kvtrace("save", "--prompt", "Why is the sky blue?", "-o", saved, "--model", tiny_llama_dir,
                   "--codec", "int8", "--steps", 3, "--label", "sky").returncode == 0
    info = kvtrace("info", saved)
    assert info.returncode == 0, info.stderr
    assert "codec:    int8" in info.stdout and "sky" in info.stdout and "sky blue" in info.stdout
    described = json.loads(kvtrace("info", saved, "--json").stdout)
    assert described["codec"] == "int8" and described["label"] == "sky"
    before = snapshot.read_info(saved)

    result = kvtrace("prune", saved, "-o", pruned, "--sinks", 2, "--recent", 5)
    assert result.returncode == 0, result.stderr
    assert f"before: {before.cache_length} entries" in result.stdout and "after:  7 entries" in result.stdout
    after = snapshot.read_info(pruned)
    assert after.codec == "int8" and after.next_position == before.next_position
    assert after.positions == before.positions[:2] + before.positions[-5:]
    assert "pruned…]" in kvtrace("info", pruned).stdout

    attention = kvtrace("prune", saved, "-o", pruned, "--method", "attention", "--budget", 9, "--codec", "int4")
    assert attention.returncode == 0, attention.stderr
    assert snapshot.read_info(pruned).cache_length == 9

    resumed = kvtrace("resume", pruned, "--steps", 4, "--model", tiny_llama_dir, "--continue", "And then?")
    assert resumed.returncode == 0, resumed.stderr


def test_bad_input_is_one_line_and_writes_nothing(tiny_llama_dir, tiny_gpt2_dir, tmp_path, capsys):
    saved = tmp_path / "s.kvs"
    assert kvtrace("save", "--prompt", "Hello", "-o", saved, "--model", tiny_llama_dir).returncode == 0
    (tmp_path / "cut.kvs").write_bytes(saved.read_bytes()[:-40])
    (tmp_path / "p.kvs").write_bytes(pickle.dumps({"a": 1}))
    out = tmp_path / "out.kvs"
    cases = [
        (("resume", tmp_path / "missing.kvs"), ["no snapshot"]),
        (("resume", tmp_path / "cut.kvs", "--model", tiny_llama_dir), ["corrupt"]),
        (("resume", saved, "--model", tiny_gpt2_dir, "-o", out), ["another model", "architecture"]),
        (("resume", saved, "--steps", -3), ["--steps"]),
        (("info", tmp_path / "p.kvs"), ["not a kvtrace snapshot"]),
        (("save", "--prompt", "Hi", "-o", tmp_path / "nowhere" / "x.kvs"), ["does not exist"]),
        (("save", "--prompt", " ", "-o", out, "--model", tiny_llama_dir), ["empty"]),
        (("prune", saved, "-o", out, "--keep-last", 3, "--sinks", 1, "--recent", 2), ["one pruning method"]),
        (("prune", saved, "-o", out), ["nothing to prune"]),
        (("prune", saved, "-o", out, "--keep-last", -1), ["zero or more"]),
        (("import", tmp_path / "p.kvs", "-o", out), ["--allow-pickle"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(kvtrace_here(capsys, *args), *fragments)
    assert_one_line_error(kvtrace(*cases[0][0]), *cases[0][1])  # and the same from a real process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.kvs", "p.kvs", "s.kvs"]


def legacy_cache(loaded, tokens: list[int]) -> tuple:
    """What old code saved: the model's past_key_values as a tuple of (K, V) per layer."""
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([tokens]), use_cache=True)
    return tuple((layer.keys.clone(), layer.values.clone()) for layer in out.past_key_values.layers)


def test_import_legacy_files(tiny_gpt2_dir, tmp_path):
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    reference = uninterrupted(loaded, PROMPT, 12)
    tokens = reference.token_ids[:-6]  # a transcript that was fully fed: the cache holds every token
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    torch.save(legacy_cache(loaded, tokens), tmp_path / "old.pt")
    with open(tmp_path / "old.pkl", "wb") as f:
        pickle.dump({"past_key_values": legacy_cache(loaded, tokens), "input_ids": tokens}, f)

    result = kvtrace("import", tmp_path / "old.pt", "-o", tmp_path / "a.kvs", "--tokens",
                     tmp_path / "tokens.json", "--model", tiny_gpt2_dir)
    assert result.returncode == 0, result.stderr
    result = kvtrace("import", tmp_path / "old.pkl", "-o", tmp_path / "b.kvs", "--allow-pickle",
                     "--model", tiny_gpt2_dir)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "executes" in result.stderr

    for name in ("a.kvs", "b.kvs"):
        state = snapshot.load(tmp_path / name, expected=loaded.fingerprint)
        assert state.token_ids == tokens and state.next_position == len(tokens) - 1
        session = TraceSession(loaded)
        session.import_state(state)
        session.generate(5)
        assert session.token_ids == reference.token_ids[:-1]


def test_import_never_runs_code_without_allow_pickle(tiny_gpt2_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    torch.save({"past_key_values": Evil()}, tmp_path / "evil.pt")  # a zip that weights_only refuses
    for name in ("evil.pkl", "evil.pt"):
        assert_one_line_error(kvtrace("import", tmp_path / name, "-o", tmp_path / "x.kvs",
                                      "--tokens", tmp_path / "t.json", "--model", tiny_gpt2_dir))
    assert not marker.exists() and not (tmp_path / "x.kvs").exists()


def test_info_shows_the_transcript_of_a_snapshot_saved_from_a_session(tiny_llama_dir, tmp_path, capsys):
    """The app saves ``session.export_state()`` as it is; ``info`` still shows the text, without a model."""
    session = TraceSession(load_model(str(tiny_llama_dir)))
    session.start_turn("Why is the sky blue?")
    session.generate(2)
    path = tmp_path / "app.kvs"
    snapshot.save(session.export_state(), path)
    described = json.loads(kvtrace_here(capsys, "info", path, "--json").stdout)
    assert "Why is the sky blue?" in described["text"]
    assert described["text"].endswith(f"⟨{session.token_text(session.context_tokens - 1)}⟩")  # the pending token


BAD_SAMPLING = [
    (["--temperature", "-1"], "temperature must be"),
    (["--temperature", "nan"], "temperature must be"),
    (["--temperature", "1", "--top-p", "0"], "top-p must be above 0"),
    (["--temperature", "1", "--top-p", "2"], "top-p must be above 0"),
    (["--top-p", "nan"], "top-p must be above 0"),
    (["--sample-top-k", "-1"], "sampling top-k must be"),
    (["--seed", "-5"], "the seed must be"),
    (["--temperature", "zz"], "invalid float value"),
]


@pytest.mark.parametrize("flags,fragment", BAD_SAMPLING, ids=[" ".join(f) for f, _ in BAD_SAMPLING])
def test_every_command_refuses_bad_sampling_settings_in_one_line(flags, fragment, tiny_llama_dir, tmp_path, capsys):
    """Checked before any model loads: no traceback (the nan one was a torch.multinomial traceback), exit 2."""
    saved = tmp_path / "s.kvs"
    commands = [
        ["save", "--prompt", "hi", "--steps", "5", "-o", saved],
        ["resume", saved, "--steps", "2"],
        ["--dump", tmp_path / "t.jsonl", "--prompt", "hi"],
        ["--print", "--prompt", "hi"],
        [],  # the app: refused before it opens
    ]
    for command in commands:
        result = kvtrace_here(capsys, *command, *flags, "--model", tiny_llama_dir)
        assert_one_line_error(result, fragment)
    assert not any(tmp_path.iterdir())


def dumped_tokens(path) -> list[int]:
    return [line["token_id"] for line in map(json.loads, path.read_text().splitlines()) if line["type"] == "step"]


def test_resume_samples_with_the_snapshots_settings_unless_flags_override(tiny_llama_dir, tmp_path, capsys):
    loaded = load_model(str(tiny_llama_dir))
    settings = SamplingSettings(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12)
    reference = TraceSession(loaded, settings)
    reference.start_turn("Tell me a story about a small robot.")
    reference.generate(12)
    paused = TraceSession(loaded, settings)
    paused.start_turn("Tell me a story about a small robot.")
    paused.generate(5)
    path = tmp_path / "paused.kvs"
    snapshot.save(paused.export_state(), path)

    assert kvtrace_here(capsys, "resume", path, "--steps", 7, "--model", tiny_llama_dir,
                        "--dump", tmp_path / "same.jsonl").returncode == 0
    assert dumped_tokens(tmp_path / "same.jsonl") == [r.token_id for r in reference.records]  # its trace, then 7

    greedy = TraceSession(loaded)
    greedy.import_state(snapshot.load(path))
    greedy.generate(7)
    assert kvtrace_here(capsys, "resume", path, "--steps", 7, "--model", tiny_llama_dir, "--temperature", "0",
                        "--dump", tmp_path / "greedy.jsonl").returncode == 0
    assert dumped_tokens(tmp_path / "greedy.jsonl") == [r.token_id for r in greedy.records]


def test_info_checks_every_record_and_names_the_damage(tiny_llama_dir, tmp_path, capsys):
    session = TraceSession(load_model(str(tiny_llama_dir)))
    session.start_turn("Why is the sky blue?")
    path = tmp_path / "s.kvs"
    snapshot.save(session.export_state(), path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # a bit inside the last payload
    damaged = tmp_path / "damaged.kvs"
    damaged.write_bytes(bytes(data))
    assert "checked:  every checksum of" in kvtrace_here(capsys, "info", path).stdout
    assert_one_line_error(kvtrace_here(capsys, "info", damaged), "corrupt", "does not match")
    assert_one_line_error(kvtrace_here(capsys, "info", damaged, "--deep"), "corrupt")
    header_only = kvtrace_here(capsys, "info", damaged, "--header")
    assert header_only.returncode == 0 and "checked:  header only" in header_only.stdout


def test_outputs_must_be_regular_files_or_new_paths(tiny_llama_dir, tmp_path, capsys):
    saved = tmp_path / "s.kvs"
    assert kvtrace_here(capsys, "save", "--prompt", "Hi", "-o", saved, "--model", tiny_llama_dir).returncode == 0
    assert_one_line_error(kvtrace_here(capsys, "prune", saved, "-o", "/dev/null", "--keep-last", 2),
                          "/dev/null", "regular files")
    assert_one_line_error(kvtrace_here(capsys, "prune", saved, "-o", tmp_path, "--keep-last", 2), "is a folder")
    assert_one_line_error(kvtrace_here(capsys, "--dump", tmp_path, "--prompt", "hi", "--model", tiny_llama_dir),
                          "is a folder")
