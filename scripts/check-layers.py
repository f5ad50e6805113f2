#!/usr/bin/env python3
"""Fails when two modules of a crate import each other, directly or around a circle.

A module is a top-level module of a crate (`src/<name>.rs` or `src/<name>/`); a reference is
any `crate::<name>` path in its files (a `use` or a path in code). A submodule's `super::`
is its parent's business and does not count. Prints each circle found, with the files that
close it, and exits 1; exits 0 when every crate's modules form layers.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def modules(src):
    """{module: [files]} of the crate whose sources are in `src`."""
    out = {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src)
        if rel.parts[0] in ("lib.rs", "main.rs") and len(rel.parts) == 1:
            continue
        name = rel.parts[0].removesuffix(".rs")
        if name == "bin":
            continue
        out.setdefault(name, []).append(f)
    return out


def strip_comments(text):
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def edges(mods):
    """{module: {imported module: first file that imports it}}."""
    out = {}
    for name, files in mods.items():
        for f in files:
            for m in REF.findall(strip_comments(f.read_text())):
                if m != name and m in mods:
                    out.setdefault(name, {}).setdefault(m, f)
    return out


def cycles(graph):
    """Every elementary circle, each once, as a list of modules."""
    found, seen = [], set()

    def walk(start, node, path):
        for nxt in sorted(graph.get(node, {})):
            if nxt == start:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append(list(path))
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def main():
    failed = False
    for src in sorted(ROOT.glob("crates/*/src")):
        graph = edges(modules(src))
        for circle in cycles(graph):
            failed = True
            crate = src.parent.name
            ring = circle + [circle[0]]
            print(f"{crate}: modules import each other: {' -> '.join(ring)}")
            for a, b in zip(ring, ring[1:]):
                print(f"  {a} -> {b}: {graph[a][b].relative_to(ROOT)}")
    if failed:
        print("Break each circle: move what both need into a lower module (see docs/architecture.md).")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
