"""`python -m dllama chat` driven through a pipe, as a script or another program would."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PipeWatcher

ROOT = Path(__file__).resolve().parent.parent


def chat(stdin: str, *flags: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllama", "chat", "--temperature", "0", "--nthreads", "1", *flags],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.timeout(300)
def test_two_turns_then_end_of_input():
    result = chat("What is the capital of France?\nAnd of Italy?\n", "--max-tokens", "24", "--max-seq-len", "512")
    assert result.returncode == 0, result.stderr
    answers = [a.strip() for a in result.stdout.split("🤖 Assistant:")[1:]]
    assert len(answers) == 2 and all(answers)
    assert "Paris" in answers[0]
    assert "Rome" in answers[1]  # the second turn saw the first: "And of Italy?" alone means nothing
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(300)
def test_a_conversation_that_outgrows_the_context_starts_over():
    """Through a pipe the next line is a message, not an answer: the chat starts over by itself
    and retries the message; one that cannot fit even alone is refused with a notice."""
    long_line = "Tell me about the sea and the sky and the mountains. " * 8
    medium = "Tell me about the sea and the sky. " * 2
    result = chat(f"{long_line}\nHello!\n{medium}\n{medium}\n", "--max-tokens", "8", "--max-seq-len", "96")
    assert result.returncode == 0, result.stderr
    assert "does not fit the context" in result.stdout  # the long line, even alone
    assert "no longer fits the context of 96 tokens. Starting over." in result.stdout
    assert "Started a new conversation" in result.stdout
    assert result.stdout.count("🤖 Assistant:") == 3  # Hello!, then each medium message
    assert "Traceback" not in result.stderr


def test_a_missing_chat_template_file_is_one_line(tmp_path):
    result = chat("hi\n", "--chat-template", str(tmp_path / "nope.jinja"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nope.jinja" in last


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_answer_and_keeps_the_conversation():
    proc = subprocess.Popen([sys.executable, "-m", "dllama", "chat", "--temperature", "0", "--nthreads", "1",
                             "--max-seq-len", "1024"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        # Both pipes are read in threads: a chat that stalls fails the wait below instead of
        # hanging the test in a read.
        out, err = PipeWatcher(proc.stdout), PipeWatcher(proc.stderr)
        proc.stdin.write("Write a very long story about a dragon.\n".encode())
        proc.stdin.flush()
        out.wait_for(lambda text: len(text.partition("🤖 Assistant:")[2]) >= 20, timeout=120)  # mid-answer
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("What is the capital of France?\n".encode())
        proc.stdin.close()
        assert proc.wait(120) == 0, err.join(30)
        text, errors = out.join(30), err.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "[stopped]" in text
    assert text.count("🤖 Assistant:") == 2
    assert "Traceback" not in errors
