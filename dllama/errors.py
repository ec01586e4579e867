"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class DllamaError(Exception):
    """A problem the user can act on: bad file, bad flag, unreachable registry."""


class FormatError(DllamaError):
    """A model, tokenizer or GGUF file that is malformed or unsupported."""
