"""``sha256_file``: the same digest as hashing the bytes at once, whatever the chunking."""
import hashlib

import pytest

from dllama.formats import digest


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 100])
def test_sha256_file_matches_hashlib(tmp_path, monkeypatch, size):
    monkeypatch.setattr(digest, "CHUNK_BYTES", 8)  # several chunks, and a short last one
    data = bytes(range(256))[:size]
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert digest.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert digest.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
