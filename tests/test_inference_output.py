"""What `inference` writes where: the text alone on stdout, per-token lines and notes on stderr,
a refused prompt never echoed, --steps beyond the context capped and said, --stats-json that
agrees with the summary and with the text."""
import json
import subprocess
import sys

import pytest

from dllama.default_model import ensure_default_model
from dllama.kernels.quants import FloatType

PROMPT = "The capital of France is"


def dllama(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dllama", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def model_flags():
    model, tokenizer = ensure_default_model(FloatType.Q40)
    return ["--model", str(model), "--tokenizer", str(tokenizer), "--max-seq-len", "64", "--nthreads", "1"]


def test_verbose_lines_and_notes_stay_off_stdout(model_flags, tmp_path):
    stats = tmp_path / "stats.json"
    out = dllama("inference", "--prompt", PROMPT, "--steps", "100", "--temperature", "0", "--verbose",
                 "--stats-json", str(stats), *model_flags)
    assert out.returncode == 0, out.stderr
    text, summary = out.stdout.split("\n\nEvaluation\n")
    assert text.startswith(PROMPT)
    assert "🔶" not in out.stdout and "💡" not in out.stdout
    per_token = [line for line in out.stderr.splitlines() if line.startswith("🔶")]
    data = json.loads(stats.read_text())
    # One --verbose line per generated token; one JSON entry per decode forward (every generated
    # token is fed back but the last one when a limit ended the generation).
    assert len(per_token) == data["generated_tokens"]
    assert len(data["tokens"]) == data["totals"]["pred_tokens"]
    assert data["totals"]["pred_tokens"] == data["generated_tokens"] - (data["finish_reason"] == "length")
    assert f"nTokens: {data['totals']['pred_tokens']}" in summary.split("Prediction")[1]
    assert text == PROMPT + data["text"]
    # --steps 100 is beyond the context of 64 positions: capped, and said so on stderr.
    assert "--steps 100 capped at the context of 64 positions" in out.stderr
    assert data["prompt_tokens"] + data["generated_tokens"] <= 64
    assert data["network"] is None
    assert all(t["sync_ms"] == 0 and t["sent_bytes"] == 0 for t in data["tokens"])


def test_a_refused_prompt_is_not_echoed(model_flags):
    out = dllama("inference", "--prompt", PROMPT, "--steps", "3", *model_flags)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "no room to generate" in out.stderr.splitlines()[-1]


@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_stats_json_path_that_cannot_be_written_is_one_line(model_flags, tmp_path, where):
    target = tmp_path / "no" / "such" / "dir.json" if where == "missing folder" else tmp_path
    out = dllama("inference", "--prompt", PROMPT, "--stats-json", str(target), *model_flags)
    assert out.returncode == 1 and out.stdout == ""  # refused before the model loads
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot write --stats-json")
    assert "Traceback" not in out.stderr


def test_stats_json_keeps_an_old_file_when_the_run_fails(model_flags, tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text("previous run")
    out = dllama("inference", "--prompt", PROMPT, "--steps", "3", "--stats-json", str(stats), *model_flags)
    assert out.returncode == 1  # the prompt leaves no room
    assert stats.read_text() == "previous run"
