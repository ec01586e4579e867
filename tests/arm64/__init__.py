"""ARM64 emulation harness (see emulate.py)."""
