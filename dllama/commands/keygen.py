"""``keygen``: this node's CurveZMQ key pair, for encrypted and authenticated cluster links."""
from __future__ import annotations

import argparse
from pathlib import Path

from dllama.commands.common import info


def main(args: argparse.Namespace) -> int:
    from dllama.transport.keys import default_key_dir, keygen, public_key

    public, secret = keygen(Path(args.out).expanduser() if args.out else default_key_dir())
    print(public_key(str(public)).decode())  # for --workers HOST:PORT@KEY and authorized keys
    info(f"💡 public key: {public} (give it to the nodes that should trust this one)")
    info(f"💡 secret key: {secret} (readable by you only; never copy it)")
    return 0
