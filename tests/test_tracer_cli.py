"""``kvtrace --dump`` end to end through ``python -m tui_app``: the schema, bad input, and no textual."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import ViTConfig

from tests.conftest import REPO_ROOT
from tracer import trace_schema


def kvtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui_app", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def test_dump_into_a_pipe_closed_early_ends_quietly(tiny_llama_dir):
    """``kvtrace --dump - | head -1``: the reader leaves early; no traceback, the SIGPIPE exit code."""
    process = subprocess.Popen([sys.executable, "-m", "tui_app", "--model", str(tiny_llama_dir), "--dump", "-",
                                "--prompt", "Count", "--max-new-tokens", "200"],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(process.stdout.readline())["type"] == "header"
    process.stdout.close()
    assert process.wait(timeout=300) == 141
    assert "Traceback" not in process.stderr.read()


def test_dump_writes_header_steps_and_end(tiny_llama_dir, tmp_path):
    out = tmp_path / "trace.jsonl"
    result = kvtrace("--model", str(tiny_llama_dir), "--dump", str(out), "--prompt", "Why is the sky blue?",
                     "--max-new-tokens", "5", "--top-k", "4")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    header, steps, end = lines[0], lines[1:-1], lines[-1]
    assert header["type"] == "header" and header["fingerprint"]["num_kv_heads"] == 2
    assert header["settings"]["top_k"] == 4 and header["messages"][-1]["content"] == "Why is the sky blue?"
    assert header["prompt_tokens"][-1]["position"] == steps[0]["position"] - 1
    assert trace_schema.problems(lines) == []
    assert [s["index"] for s in steps] == list(range(5)) and end == {
        "type": "end", "stop_reason": "max_tokens", "generated": 5, "transcript_tokens": steps[-1]["position"] + 1,
        "reply": end["reply"]}
    for step in steps:
        assert len(step["top"]) == 4 and len(step["lens"]) == 2
        assert step["lens"][-1]["top"][0]["token_id"] == step["token_id"]  # greedy: the last layer decides
        assert sum(step["attention"]["mean"]) == pytest.approx(1.0, abs=1e-4)
    # random weights may end on half a character, which the incremental decoder holds back
    assert end["reply"].startswith("".join(s["text"] for s in steps))


def test_dump_to_stdout_without_lens(tiny_gpt2_dir):
    result = kvtrace("--model", str(tiny_gpt2_dir), "--dump", "-", "--prompt", "Hello", "--max-new-tokens", "3",
                     "--no-lens", "--temperature", "0.8", "--seed", "3")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["header", "step", "step", "step", "end"]
    assert all(line["lens"] is None for line in lines[1:-1])


def test_headless_dump_never_imports_textual(tiny_gpt2_dir, tmp_path):
    code = (
        "import sys; from tui_app.cli import main; code = main(sys.argv[1:]); "
        "print('textual' in sys.modules); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--model", str(tiny_gpt2_dir), "--dump", str(tmp_path / "t.jsonl"),
         "--prompt", "Hello", "--max-new-tokens", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.fixture
def not_causal_dir(tmp_path) -> Path:
    ViTConfig().save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


@pytest.fixture
def corrupt_gguf(tmp_path) -> Path:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty prompt", "the prompt is empty"),
        ("long prompt", r"the prompt is \d+ tokens long, but .* at most 256 tokens"),
        ("unknown model", "neither a local path nor in the local Hugging Face cache"),
        ("not causal", "'vit' model, which is not a causal language model"),
        ("missing path", "no such model file or folder: ./no/such/model"),
        ("corrupt gguf", "cannot load model .*broken.gguf"),
        ("bad sampling", "top-p must be above 0"),
        ("bad output", "cannot write .*/no/such/dir/t.jsonl: the folder .* does not exist"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(case, expected, tiny_llama_dir, not_causal_dir, corrupt_gguf, tmp_path):
    model = {"unknown model": "no-such-org-xyz/no-such-model", "not causal": str(not_causal_dir),
             "missing path": "./no/such/model", "corrupt gguf": str(corrupt_gguf)}.get(case, str(tiny_llama_dir))
    prompt = {"empty prompt": "  ", "long prompt": "story " * 300}.get(case, "Hello")
    extra = ["--top-p", "0"] if case == "bad sampling" else []
    target = tmp_path / "no" / "such" / "dir" / "t.jsonl" if case == "bad output" else tmp_path / "t.jsonl"
    result = kvtrace("--model", model, "--dump", str(target), "--prompt", prompt, *extra)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("kvtrace: error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(expected, errors[0]), errors[0]
    assert not (tmp_path / "t.jsonl").exists()


def test_step_line_matches_the_record_dict(tiny_llama_dir):
    from tracer.dump import step_line
    from tracer.loading import load_model
    from tracer.session import TraceSession

    session = TraceSession(load_model(str(tiny_llama_dir)))
    session.start_turn("Hello")
    session.generate(2)
    session.lens(0)
    for record in session.records:
        assert json.loads(json.dumps(step_line(record))) == json.loads(json.dumps({"type": "step", **record.to_dict()}))


def test_print_renders_a_readable_trace(tiny_llama_dir, capsys):
    from tui_app.cli import main

    assert main(["--print", "--model", str(tiny_llama_dir), "--prompt", "Why is the sky blue?",
                 "--max-new-tokens", "4"]) == 0
    shown = capsys.readouterr().out
    assert "Why is the sky blue?" in shown and "Step by step" in shown and "settles" in shown
    lines = shown.splitlines()
    assert all(len(line) <= 80 for line in lines)  # laid out for the width it gets
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("Lens grid"))]
    rows = [line for line in table if re.match(r"^ +[0-3] ", line)]
    assert [row.split()[0] for row in rows] == ["0", "1", "2", "3"]  # one line per token, none wrapped


def test_print_uses_a_wide_terminal_for_lens_columns(tiny_llama_dir):
    from rich.console import Console

    from tracer.loading import load_model
    from tracer.render import trace_view
    from tracer.session import TraceSession

    session = TraceSession(load_model(str(tiny_llama_dir)))
    session.start_turn("Why is the sky blue?")
    session.generate(3)
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(trace_view(session, "Why is the sky blue?", 140))
    shown = console.export_text()
    assert " L0 " in shown and " L1 " in shown and "█" in shown
    assert all(len(line) <= 140 for line in shown.splitlines())


def test_hub_id_in_the_local_cache_loads_offline(tiny_gpt2_dir, tmp_path):
    """A Hugging Face id resolves through the local hub cache layout, with no network."""
    repo = tmp_path / "hub" / "models--kvtrace--tiny-gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in tiny_gpt2_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    result = subprocess.run(
        [sys.executable, "-m", "tui_app", "--model", "kvtrace/tiny-gpt2", "--dump", "-", "--prompt", "Hello",
         "--max-new-tokens", "2", "--no-lens"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    header = json.loads(result.stdout.splitlines()[0])
    assert header["model"] == "tiny-gpt2" and header["fingerprint"]["model_id"] == "kvtrace/tiny-gpt2"


def test_dump_with_attribution_and_tensors(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    out, folder = tmp_path / "trace.jsonl", tmp_path / "tensors" / "run"
    result = kvtrace("--model", str(tiny_llama_dir), "--dump", str(out), "--prompt", "Why is the sky blue?",
                     "--max-new-tokens", "3", "--attribution", "--tensors", str(folder))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert trace_schema.problems(lines) == []
    assert lines[0]["settings"]["attribution"] is True and lines[0]["settings"]["tensors"] == str(folder)
    for step in lines[1:-1]:
        attribution = step["attribution"]
        assert attribution["token_id"] == step["token_id"] and len(attribution["layers"]) == 2
        explained = attribution["embedding"] + sum(attribution["layers"]) + attribution["bias"]
        assert explained == pytest.approx(attribution["total"], abs=1e-3)
        tensors = load_file(folder / f"step-{step['index']:05d}.safetensors")
        assert int(tensors["logits"].argmax()) == step["lens"][-1]["top"][0]["token_id"]
        sidecar = json.loads((folder / f"step-{step['index']:05d}.json").read_text())
        assert (sidecar["token_id"], sidecar["position"]) == (step["token_id"], step["position"])
    del lines[1]["attribution"]
    assert trace_schema.problems(lines) == ["line 2 (step): no attribution but settings.attribution is true"]


def test_attribution_and_tensors_without_dump_are_refused(tiny_llama_dir):
    result = kvtrace("--model", str(tiny_llama_dir), "--attribution")
    assert result.returncode == 2 and result.stderr.strip() == "kvtrace: error: --attribution and --tensors go with --dump FILE"
