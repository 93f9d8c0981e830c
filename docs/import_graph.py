#!/usr/bin/env python
"""The import graph of hf_distill and its recipes, read from the source with `ast` (nothing is imported or run).

    python docs/import_graph.py                 # prints the parts, floor by floor, and any circle
    python docs/import_graph.py --draw docs/architecture.png   # the library's parts, and the recipes over it

Nodes are the files of `hf_distill/`, `tasks/` (installed as `hf_distill.tasks`) and `scripts/` (installed as
`hf_distill.scripts`); an edge A -> B means A imports B, anywhere in the file (imports inside functions count:
they are a dependency all the same). Parts are the units a reader sees in the tree: a subpackage (every file
under `hf_distill/caches/` is the part `hf_distill/caches/`) or a top-level module (`hf_distill/trainer.py`).
`tests/test_architecture.py` checks with it that neither files nor parts import each other in a circle, and so
that every import runs from a higher floor to a lower one.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's files live in the repository.
ROOTS = {
    "hf_distill": REPO / "hf_distill",
    "hf_distill.tasks": REPO / "tasks",
    "hf_distill.scripts": REPO / "scripts",
}
# `tasks` and `scripts` are also importable by those names from the repository root (tests, benchmarks).
ALIASES = {"tasks": "hf_distill.tasks", "scripts": "hf_distill.scripts"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    modules = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _absolute(module: str, level: int, name: str | None, is_package: bool) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _canonical(name: str) -> str:
    head, _, rest = name.partition(".")
    if head in ALIASES:
        return ALIASES[head] + ("." + rest if rest else "")
    return name


def imports_of(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The known modules `module` imports (a `from package import name` counts as the submodule when `name` is
    one, else as the package)."""
    known = set(known)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = _canonical(alias.name)
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    found.add(name)
        elif isinstance(node, ast.ImportFrom):
            base = _canonical(_absolute(module, node.level, node.module, path.name == "__init__.py"))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in known:
                    found.add(candidate)
                    continue
                name = base
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    found.add(name)
    found.discard(module)
    return found


def file_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def part_of(module: str, modules: dict[str, Path]) -> str:
    """The part a module belongs to: its subpackage's folder, or the top-level module itself (paths as in the
    tree: `hf_distill/caches/`, `hf_distill/trainer.py`, `tasks/lm/`, `scripts/compress.py`)."""
    for package, root in sorted(ROOTS.items(), key=lambda item: -len(item[0])):
        if module == package or module.startswith(package + "."):
            rest = module[len(package) + 1 :].split(".") if module != package else []
            prefix = root.relative_to(REPO).as_posix()
            if not rest:
                return f"{prefix}/__init__.py"
            if (root / rest[0]).is_dir():
                return f"{prefix}/{rest[0]}/"
            return f"{prefix}/{rest[0]}.py"
    raise ValueError(module)


def part_graph(files: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    files = file_graph() if files is None else files
    modules = module_files()
    parts: dict[str, set[str]] = {}
    for module, targets in files.items():
        source = part_of(module, modules)
        parts.setdefault(source, set())
        for target in targets:
            destination = part_of(target, modules)
            # A package's face (its __init__) hands its parts' names on: it is not a dependency of theirs.
            if destination != source and not destination.endswith("__init__.py"):
                parts[source].add(destination)
    return parts


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Floor 1 imports nothing of the graph; every node stands one floor above the highest node it imports.
    Needs an acyclic graph."""
    floor: dict[str, int] = {}

    def height(node: str, seen: tuple[str, ...] = ()) -> int:
        if node in floor:
            return floor[node]
        if node in seen:
            raise ValueError(f"circle through {node}")
        floor[node] = 1 + max((height(t, (*seen, node)) for t in graph.get(node, ())), default=0)
        return floor[node]

    for node in graph:
        height(node)
    return floor


def draw(graph: dict[str, set[str]], path: Path, line_counts: dict[str, int], title: str) -> None:
    """The parts floor by floor (ground floor at the bottom), box width by lines of code, arrows for imports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    floor = floors(graph)
    rows: dict[int, list[str]] = {}
    for node in sorted(graph, key=lambda n: (floor[n], n)):
        rows.setdefault(floor[node], []).append(node)
    height = max(rows)
    width = max(len(members) for members in rows.values())
    fig, ax = plt.subplots(figsize=(max(10, 2.6 * width), 1.3 * height + 1))
    centre: dict[str, tuple[float, float]] = {}
    for level, members in rows.items():
        for i, node in enumerate(members):
            x = (i + 0.5) * width / len(members)
            centre[node] = (x, level)
    for source, targets in graph.items():
        for target in targets:
            (x0, y0), (x1, y1) = centre[source], centre[target]
            ax.add_patch(
                FancyArrowPatch(
                    (x0, y0 - 0.18), (x1, y1 + 0.18), arrowstyle="-|>", mutation_scale=8, lw=0.5,
                    color="#8a8a8a", alpha=0.6, connectionstyle="arc3,rad=0.05",
                )
            )  # fmt: skip
    for node, (x, y) in centre.items():
        lines = line_counts.get(node, 0)
        box_width = 0.6 + min(lines, 4000) / 4000 * 0.3
        colour = "#dce9f7" if node.endswith("/") or node.endswith("(library)") else "#f4e6cc"
        ax.add_patch(
            FancyBboxPatch(
                (x - box_width / 2, y - 0.18), box_width, 0.36, boxstyle="round,pad=0.02",
                facecolor=colour, edgecolor="#4a4a4a", lw=0.8,
            )
        )  # fmt: skip
        ax.text(x, y + 0.03, node, ha="center", va="center", fontsize=8)
        ax.text(x, y - 0.11, f"{lines:,} lines", ha="center", va="center", fontsize=6, color="#555555")
    for level in rows:
        ax.text(-0.3, level, f"floor {level}", ha="right", va="center", fontsize=7, color="#777777")
    ax.set_xlim(-1.2, width + 0.3)
    ax.set_ylim(0.4, height + 0.6)
    ax.axis("off")
    ax.set_title(f"{title}; arrows are imports, each pointing down", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_lines(graph: dict[str, set[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in graph:
        target = REPO / part
        files = list(target.rglob("*.py")) if part.endswith("/") else [target]
        counts[part] = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    return counts


_TRIVIAL = (
    "hf_distill/__init__.py",
    "hf_distill/__main__.py",
    "hf_distill/_moved.py",
    "hf_distill/version.py",
    "scripts/__init__.py",
    "tasks/__init__.py",
)


def library_view(parts: dict[str, set[str]]) -> dict[str, set[str]]:
    """The library's parts alone (hf_distill/...), without the package face and its bookkeeping modules."""
    keep = {
        p for p in parts if p.startswith("hf_distill/") and p not in _TRIVIAL and p != "hf_distill/cli.py"
    }
    return {p: {t for t in parts[p] if t in keep} for p in keep}


def recipes_view(parts: dict[str, set[str]]) -> dict[str, set[str]]:
    """Scripts and tasks over the library, which is drawn as one box."""
    library = "hf_distill/ (library)"

    def name(part: str) -> str | None:
        if part in _TRIVIAL:
            return None
        return library if part.startswith("hf_distill/") else part

    view: dict[str, set[str]] = {}
    for source, targets in parts.items():
        if name(source) is None:
            continue
        view.setdefault(name(source), set())
        view[name(source)].update(n for t in targets if (n := name(t)) is not None and n != name(source))
    return view


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--draw",
        type=Path,
        help="write PNGs of the parts and their imports: NAME.png (the library), NAME_recipes.png (scripts, tasks)",
    )
    args = parser.parse_args()
    files = file_graph()
    parts = part_graph(files)
    for kind, graph in (("file", files), ("part", parts)):
        found = circles(graph)
        print(f"{kind} circles: {len(found)}")
        for circle in found:
            print("  " + " <-> ".join(circle))
    if circles(parts):
        return
    floor = floors(parts)
    for level in sorted(set(floor.values()), reverse=True):
        print(f"floor {level:2d}: " + ", ".join(sorted(n for n in floor if floor[n] == level)))
    if args.draw:
        counts = part_lines(parts)
        counts["hf_distill/ (library)"] = sum(v for k, v in counts.items() if k.startswith("hf_distill/"))
        recipes_path = args.draw.with_name(args.draw.stem + "_recipes.png")
        draw(
            library_view(parts),
            args.draw,
            counts,
            "hf_distill: the library's parts (folders blue, modules beige)",
        )
        draw(recipes_view(parts), recipes_path, counts, "scripts and tasks over the library")
        print(f"wrote {args.draw} and {recipes_path}")


if __name__ == "__main__":
    main()
