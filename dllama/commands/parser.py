"""The command line's grammar: every subcommand's flags, and the range checks argparse cannot do.

Kept apart from ``main`` (which dispatches and turns errors into one line) so that ``launch`` can
check the flags it passes on against the command it will run without importing the dispatcher.
Nothing heavy is imported here: ``--nthreads`` must reach the environment before NumPy starts.
"""
from __future__ import annotations

import argparse
import math
from urllib.parse import urlsplit


def _show_default(value: object) -> str:
    """A default as ``--help`` shows it: 10 rather than 10.0, a list as its words, [] as none."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(_show_default, value)) or "none"
    return str(value)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help. A default of None means something that
    depends on the run (the model's context, all cores...): the help text says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return f"{text} (default: {_show_default(action.default).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2; defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=".m model file (default: SmolLM2-135M-Instruct, downloaded once)")
    p.add_argument("--tokenizer", help=".t tokenizer file (default: the default model's)")
    p.add_argument("--nthreads", type=int, default=None, help="threads for the kernels (default: all cores)")
    p.add_argument("--buffer-float-type", choices=["f32", "q80"], default="f32",
                   help="activations before matmuls with quantized weights (q80 as distributed-llama)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV cache length (default: the model's, at most 4096)")


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", nargs="+", default=[], metavar="HOST:PORT[@KEY]",
                   help="workers to compute with (each runs `dllama worker`); the root is node 0. With @KEY (the "
                        "worker's public key, or its node.key file) every link is encrypted and the worker must "
                        "prove it holds that key")
    _key_flag(p, "this root's key pair, used when the workers are given with @KEY")
    p.add_argument("--split", nargs="+", default=None, metavar="W",
                   help="relative speed of each node, root first: faster nodes get larger slices; or `auto`: "
                        "by the speed each node measures of itself at start (default: equal)")
    p.add_argument("--net-timeout", type=float, default=10.0,
                   help="seconds a worker may take to answer the root's greeting and set-up messages")
    _heartbeat_flag(p)
    p.add_argument("--on-worker-loss", choices=["continue", "fail"], default="continue",
                   help="when a worker is lost: go on with the nodes left (and take it back when it returns), "
                        "or stop as distributed-llama does")
    p.add_argument("--verbose", action="store_true", help="a line per token on stderr: compute and sync ms, kB sent/received")


def _key_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--key", default=None, metavar="DIR",
                   help=f"folder of {what} (node.key, node.key_secret; default $DLLAMA_HOME/keys, "
                        f"made by `dllama keygen`)")


def _heartbeat_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heartbeat-timeout", type=float, default=2.5, metavar="S",
                   help="a node whose link goes this long without answering a heartbeat is lost (its process "
                        "died or froze); a slow node still answers, however long its forward takes")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 means greedy (argmax)")
    p.add_argument("--topp", type=float, default=0.9,
                   help="nucleus sampling: sample from the most likely tokens that hold this much probability")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed: same seed, same text (default: a new one each run)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dllama", description="Distributed LLM inference (distributed-llama compatible).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inference", help="generate text from a prompt")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--steps", type=int, default=256,
                   help="positions to fill, prompt included (at most the context: --max-seq-len)")
    p.add_argument("--stats-json", default=None, metavar="FILE",
                   help="write per-token compute and sync times, bytes and totals to FILE as JSON (default: none)")
    _model_flags(p)
    _cluster_flags(p)
    _sampling_flags(p)

    p = sub.add_parser("perplexity", help="perplexity of the model on a text")
    p.add_argument("--prompt", required=True, help="the text to score")
    _model_flags(p)
    _cluster_flags(p)

    p = sub.add_parser("chat", help="chat with the model in the terminal")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=None, help="answer length limit (default: the context)")
    _model_flags(p)
    _cluster_flags(p)
    _sampling_flags(p)

    p = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=9990, help="port to listen on")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 requests; repeat for several keys "
                        "(default: no key, anyone who reaches the port may use the API)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="more API keys, one per line (# comments); with --api-key, both count (default: none)")
    p.add_argument("--ssl-certfile", default=None, metavar="FILE",
                   help="serve HTTPS with this certificate (PEM; with --ssl-keyfile) (default: none, plain HTTP)")
    p.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                   help="the certificate's private key (PEM) (default: none)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template (default: the model's)")
    p.add_argument("--model-id", default=None, help="the model's id in the API (default: the model file's name)")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="requests generated at once, in one batch (each takes a KV cache slot of --max-seq-len "
                        "positions; more wait in line)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (scheme://host[:port], or * for any) call the API from a "
                        "browser; repeat for several (default: none, no CORS headers)")
    _model_flags(p)
    _cluster_flags(p)

    p = sub.add_parser("worker", help="serve a root: compute a slice of its model")
    p.add_argument("--port", type=int, default=9998, help="port to listen on")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--nthreads", type=int, default=None, help="threads for the kernels (default: all cores)")
    p.add_argument("--cache-dir", default=None,
                   help="keep received slices here; a root restarted with the same model sends no weights, and "
                        "one that plans again sends only what the cached slices miss (default: none)")
    p.add_argument("--model", default=None, metavar="FILE_OR_FOLDER",
                   help="a local copy of the root's .m file (or a folder of them): the worker cuts its slices "
                        "from it for any plan, and the root sends no weights (default: none)")
    p.add_argument("--authorized-keys", default=None, metavar="FILE",
                   help="serve only roots whose public key is in FILE (one per line, # comments), over encrypted "
                        "links; the worker uses its own key pair (--key). (default: none: plaintext, any root)")
    _key_flag(p, "this worker's key pair, used with --authorized-keys")
    _heartbeat_flag(p)

    p = sub.add_parser("keygen", help="make this node's key pair for encrypted, authenticated links")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder to write node.key (public) and node.key_secret into (default $DLLAMA_HOME/keys)")

    p = sub.add_parser("tokenize", help="show the token ids of a text")
    p.add_argument("text", help="the text, or - to read standard input")
    p.add_argument("--tokenizer", help=".t tokenizer file (default: the default model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids and pieces")

    p = sub.add_parser("launch", help="download a ready-made model by name, then print or run its command",
                       allow_abbrev=False,
                       epilog="Other flags (--workers, --nthreads, --prompt, --port, ...) are passed to the command.")
    p.add_argument("name", nargs="?", help="the model (see --list); '-' and '_' alike, any case")
    p.add_argument("--list", action="store_true", help="list the models: size, memory need")
    p.add_argument("--dir", default=None, help="folder for the model's files (default: $DLLAMA_HOME/models/NAME)")
    p.add_argument("--run", action="store_true", help="run the command instead of printing it")
    p.add_argument("--command", dest="launch_command", choices=["chat", "inference", "api"], default="chat",
                   help="the command to print or run")

    p = sub.add_parser("convert", help="convert a model into distributed-llama files")
    conv = p.add_subparsers(dest="source", metavar="SOURCE", parser_class=_Parser, required=True)
    g = conv.add_parser("gguf", help="from a llama.cpp GGUF file")
    g.add_argument("file", help="the .gguf file")
    _output_flags(g, "the GGUF's", None, "the GGUF's own type when .m has it (Q4_0: q40, Q8_0: q80, F16, F32: "
                                          "copied bit for bit), else q80 for other quantized types")
    g = conv.add_parser("hf", help="from a Hugging Face model folder (config.json, *.safetensors, tokenizer)")
    g.add_argument("folder", help="the folder with config.json, the safetensors shards and tokenizer.json")
    _output_flags(g, "the folder's name", "q40")
    return parser


def _output_flags(p: argparse.ArgumentParser, default_name: str, default_type: str | None,
                  default_words: str = "") -> None:
    """What every converter writes, and where."""
    p.add_argument("--weights-float-type", choices=["q40", "q80", "f16", "f32"], default=default_type,
                   help="type of the weights in the .m file" + (f" (default: {default_words})" if default_words else "")
                   + "; rounding to q40 is calibrated on a built-in text when the model as float32 takes at most "
                     "1/4 of memory")
    p.add_argument("--output-dir", default=".", help="where to write the .m and .t files")
    p.add_argument("--name", default=None, help=f"file name stem (default: {default_name})")


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (``parser.error``: one line, exit code 2) for values out of their range."""
    for flag, minimum in (("steps", 1), ("nthreads", 1), ("max_seq_len", 1), ("max_tokens", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            parser.error(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    temperature = getattr(args, "temperature", 0.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0, got {temperature}")
    if getattr(args, "seed", None) is not None and not 0 <= args.seed < 2**64:
        parser.error(f"--seed must be in 0 .. 2^64-1, got {args.seed}")
    port = getattr(args, "port", None)
    if port is not None and not 0 < port < 65536:
        parser.error(f"--port must be in 1..65535, got {port}")
    for flag in ("net_timeout", "heartbeat_timeout"):
        timeout = getattr(args, flag, 1.0)
        if not (math.isfinite(timeout) and 0.1 <= timeout <= 86400):
            parser.error(f"--{flag.replace('_', '-')} must be between 0.1 and 86400 seconds, got {timeout}")
    split = getattr(args, "split", None)
    if split == ["auto"]:
        args.split = "auto"
    elif split is not None:
        try:
            split = args.split = [float(w) for w in split]
        except ValueError:
            parser.error(f"--split takes `auto` or one number per node, got {' '.join(split)}")
        if len(split) != 1 + len(args.workers):
            parser.error(f"--split needs one weight per node ({1 + len(args.workers)}: the root, then each worker), "
                         f"got {len(split)}")
        if not all(math.isfinite(w) and w > 0 for w in split):
            parser.error("--split weights must be positive numbers")
    topp = getattr(args, "topp", 1.0)
    if not 0 < topp <= 1:  # also false for nan
        parser.error("--topp must be in (0, 1]")
    parallel = getattr(args, "parallel", 1)
    if not 1 <= parallel <= 16:
        parser.error("--parallel must be 1 to 16")
    for origin in getattr(args, "cors_origin", None) or []:
        if (problem := origin_problem(origin)) is not None:
            parser.error(problem)


def origin_problem(origin: str) -> str | None:
    """Why ``origin`` cannot be a ``--cors-origin`` (None when it can). A browser sends exactly
    ``scheme://host[:port]``, lower case, without a default port: anything else (a path, even a
    trailing /) would never match, so it is refused here rather than ignored there."""
    if origin == "*":
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
        good = parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0
    except ValueError:  # a bad port
        good = False
    if not good:
        return f"--cors-origin must be * or scheme://host[:port] (as https://example.com), got {origin!r}"
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"  # IPv6
    default_port = {"http": 80, "https": 443}[parts.scheme]
    exact = f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default_port) else "")
    if origin != exact:
        return f"--cors-origin takes an origin as browsers send it, {exact!r}, got {origin!r}"
    return None
