"""The package's shape, read from its source with ``ast``: no import cycles, dependencies that
point one way (commands -> engine -> model -> kernels; transport beside the model), modules of
one job, and the numba cache's key covering every compiled source."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dllama"
# Modules allowed over MAX_LINES, and why: each does one job that needs the room.
MAX_LINES = 500
LONG_MODULES = {
    "dllama.hub.download": "one job: an HTTP download that resumes, retries with backoff, shows progress and "
                           "checks size and checksum (joining parts and the lock live in join.py and lock.py)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (top level, inside
    functions, under TYPE_CHECKING): ``from a.b import c`` counts as ``a.b.c`` when that is a
    module, else as ``a.b``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    found.add(f"{base}.{a.name}")
                elif base in MODULES:
                    found.add(base)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_graph_sees_imports():
    """The checks below are only as good as the graph: it must see lazy and relative imports."""
    assert "dllama.model.jit_blocks" in GRAPH["dllama.model.blocks"]  # imported inside a function
    assert "dllama.kernels.jit.blocks" in GRAPH["dllama.model.jit_blocks"]  # from a import module
    assert "dllama.engine.session" in GRAPH["dllama.commands.run"]


def test_no_import_cycle():
    """Every strongly connected component of the import graph is a single module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


LAYERS = {
    # package: packages of dllama it must never import
    "dllama.kernels": ("formats", "model", "engine", "transport", "commands", "hub", "default_model", "machine"),
    "dllama.formats": ("kernels.jit", "model", "engine", "transport", "commands", "hub"),
    "dllama.model": ("engine", "transport", "commands", "hub"),
    "dllama.transport": ("model", "engine", "commands", "hub"),
    "dllama.engine": ("commands",),
    "dllama.hub": ("model", "engine", "transport", "commands"),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_dependencies_point_one_way(layer):
    bad = []
    for name, imported in GRAPH.items():
        if name == layer or name.startswith(layer + "."):
            for target in imported:
                if any(target == f"dllama.{f}" or target.startswith(f"dllama.{f}.") for f in LAYERS[layer]):
                    bad.append(f"{name} -> {target}")
    assert bad == []


def test_modules_stay_small():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) == set(LONG_MODULES), long


def _cached_jit_functions(path: Path) -> list[str]:
    """Functions decorated ``@njit(cache=True, ...)``, ``@jit(cache=True)`` or
    ``@overload(..., jit_options={"cache": True})``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if not (isinstance(d, ast.Call) and ast.unparse(d.func).split(".")[-1] in ("njit", "jit", "overload")):
                    continue
                options = {k.arg: k.value for k in d.keywords}
                jit_options = options.get("jit_options")
                if isinstance(jit_options, ast.Dict):
                    options.update({ast.literal_eval(k): v for k, v in zip(jit_options.keys, jit_options.values)})
                if isinstance(options.get("cache"), ast.Constant) and options["cache"].value is True:
                    names.append(node.name)
    return names


def test_cached_kernels_live_where_the_cache_key_looks():
    """numba checks only a cached function's own file for changes; the cache folder is named after
    every kernel source (``numba_config.kernel_sources``), so no cached jitted function may live
    outside them."""
    from dllama.kernels.numba_config import kernel_sources

    sources = set(kernel_sources().values())
    outside = {name: funcs for name, p in MODULES.items() if p.resolve() not in sources
               and (funcs := _cached_jit_functions(p))}
    assert outside == {}
    inside = [f for p in sources for f in _cached_jit_functions(p)]
    assert {"attention_block", "_linear_into", "argmax"} <= set(inside)  # the scan sees them


def test_the_cache_folder_follows_every_kernel_source(tmp_path):
    """The cache folder is named after every file of the kernels, by content: a changed source
    (a copy here, so the package itself is never touched) names a new folder."""
    from dllama.kernels import numba_config

    sources = numba_config.kernel_sources()
    assert set(sources.values()) == {p.resolve() for p in PACKAGE.joinpath("kernels").rglob("*.py")}
    digest = numba_config.sources_digest(sources)
    assert numba_config.cache_dir().endswith(digest[:16])
    changed = tmp_path / "blocks.py"
    changed.write_bytes(sources["jit/blocks.py"].read_bytes() + b"\n# changed\n")
    assert numba_config.sources_digest({**sources, "jit/blocks.py": changed}) != digest


def test_kernels_are_stamped_by_content_not_mtime(tmp_path):
    """Reinstalling the same version rewrites the kernel files with new mtimes; numba before 0.68
    then recompiled everything. Our kernels' cache entries are stamped by file contents."""
    import os

    from dllama.kernels.jit import matmul, quantize
    from dllama.kernels.numba_config import content_stamp

    for kernel in (matmul.product, quantize.quantize_activation):
        assert type(kernel._cache._impl.locator).__name__ == "KernelCacheLocator"
    source = tmp_path / "kernel.py"
    source.write_text("x = 1\n")
    stamp = content_stamp(str(source))
    os.utime(source, (1_000_000_000, 1_000_000_000))  # as a reinstall would: same bytes, new mtime
    assert content_stamp(str(source)) == stamp
    source.write_text("x = 2\n")
    assert content_stamp(str(source)) != stamp


def test_block_arguments_are_named_as_the_blocks_take_them():
    """The jitted blocks take their arguments splatted from named tuples: the tuples' fields must
    be the functions' parameters, in order, so that nothing is matched by counting."""
    from dllama.kernels.jit import blocks

    def params(fn, skip: int) -> list[str]:
        return list(inspect.signature(fn.py_func).parameters)[skip:]

    assert list(blocks.AttentionArgs._fields) == params(blocks.attention_block, 3)  # after x, slots, positions
    assert list(blocks.FeedForwardArgs._fields) == params(blocks.ffn_block, 1)
    assert list(blocks.ExpertArgs._fields) == params(blocks.expert_ffn, 1)
    assert list(blocks.EndArgs._fields) == params(blocks.end_block, 1)
    assert list(blocks.FeedForwardArgs._fields[2:]) == list(blocks.ExpertArgs._fields)
