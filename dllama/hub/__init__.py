"""Ready-made models: a catalog of distributed-llama's published models and a robust downloader.

``python -m dllama launch NAME`` uses both; see ``catalog`` and ``download``. ``launch`` imports
them only after the flags are parsed (they import NumPy, which must see ``--nthreads`` first).
"""
from dllama.hub.catalog import (CATALOG, DEFAULT_NAME, CatalogEntry, RemoteFile, add_entry, find,
                                normalize_name, part_suffix, suggestions)
from dllama.hub.download import (HF_URL, HUB_URL_ENV, Downloader, ModelPaths, check_model_file, download_model,
                                 fetch, hub_url, models_dir)

__all__ = [
    "CATALOG", "DEFAULT_NAME", "CatalogEntry", "RemoteFile", "add_entry", "find", "normalize_name",
    "part_suffix", "suggestions", "HF_URL", "HUB_URL_ENV", "Downloader", "ModelPaths", "check_model_file",
    "download_model", "fetch", "hub_url", "models_dir",
]
