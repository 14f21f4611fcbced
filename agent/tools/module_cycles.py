#!/usr/bin/env python3
"""Lists import cycles between the agent's modules.

Reads agent/src (lib.rs is the crate root, `crate`; main.rs is another crate and is skipped),
takes every path a module names (`crate::a::b`, `super::x`, `self::x`, `child::x`, and the
`use crate::{a, b::{c}}` forms; comments are ignored, `#[cfg(test)]` code is not), resolves it
to the deepest module it names, and prints the strongly connected components of two graphs:
top-level modules (`archive`, `daemon`, ...) and every module (`archive::write`, ...).
Exits 1 if there is a cycle.

Usage: python3 agent/tools/module_cycles.py [-v] [agent/src]   (-v: print every module's edges)
"""
import os
import re
import sys

ARGS = [a for a in sys.argv[1:] if not a.startswith("-")]
SRC = ARGS[0] if ARGS else os.path.join(os.path.dirname(__file__), "..", "src")


def module_files(src):
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts == ["main"]:
                continue
            if parts == ["lib"]:
                mods[()] = os.path.join(src, rel)
                continue
            if parts[-1] == "mod":
                parts = parts[:-1]
            mods[tuple(parts)] = os.path.join(src, rel)
    return mods


def strip_comments(text):
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif text.startswith("b'", i) or (text[i] == "'" and i + 2 < n and text[i + 2] == "'"):
            j = text.find("'", i + 2)
            out.append("' '")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def parse_tree(text, i):
    """Parses a use tree at text[i:]; returns (list of paths, end index)."""
    paths, seg = [], []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            i += 1
            while True:
                sub, i = parse_tree(text, i)
                paths += [seg + p for p in sub]
                while i < len(text) and text[i].isspace():
                    i += 1
                if i < len(text) and text[i] == ",":
                    i += 1
                    while i < len(text) and text[i].isspace():
                        i += 1
                    if i < len(text) and text[i] == "}":
                        return paths, i + 1
                    continue
                if i < len(text) and text[i] == "}":
                    return paths, i + 1
                return paths, i
        m = re.compile(IDENT + r"|\*").match(text, i)
        if not m:
            return paths + ([seg] if seg else []), i
        seg = seg + [m.group(0)]
        i = m.end()
        if text.startswith("::", i):
            i += 2
            continue
        return paths + [seg], i


def resolve(mods, base, path):
    """The deepest module `path` (absolute segments) names."""
    best = ()
    for k in range(1, len(path) + 1):
        if tuple(path[:k]) in mods:
            best = tuple(path[:k])
        else:
            break
    return best if best else (() if base is not None else None)


def deps(mods, mod, text):
    text = strip_comments(text)
    found = set()
    # Inline modules (`mod tests { ... }`) shift what `super` and `self` mean.
    inline = []  # (depth at open, name)
    depth = 0
    i = 0
    children = {k[len(mod)] for k in mods if len(k) == len(mod) + 1 and k[: len(mod)] == mod}
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            i += 1
            continue
        if c == "}":
            depth -= 1
            if inline and inline[-1][0] == depth:
                inline.pop()
            i += 1
            continue
        m = re.compile(r"\bmod\s+(" + IDENT + r")\s*\{").match(text, i)
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            inline.append((depth, m.group(1)))
            depth += 1
            i = m.end()
            continue
        m = re.compile(r"(crate|super|self|" + IDENT + r")::").match(text, i)
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_:")):
            head = m.group(1)
            here = list(mod) + [n for _, n in inline]
            paths, end = parse_tree(text, m.end())
            if head == "crate":
                prefix = []
            elif head in ("super", "self"):
                prefix = list(here)
                j = i
                while True:
                    if text.startswith("super::", j):
                        prefix = prefix[:-1]
                        j += len("super::")
                    elif text.startswith("self::", j):
                        j += len("self::")
                    else:
                        break
                paths, end = parse_tree(text, j)
            elif not inline and head in children:
                prefix = list(mod)
                paths = [[head] + p for p in paths]
            else:
                i = m.end()
                continue
            for p in paths:
                target = resolve(mods, mod, prefix + p)
                if target is not None:
                    found.add(target)
            i = max(end, m.end())
            continue
        i += 1
    found.discard(mod)
    return found


def sccs(graph):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(m):
    return "::".join(m) if m else "crate"


def main():
    mods = module_files(SRC)
    full = {}
    for mod, path in sorted(mods.items()):
        with open(path, encoding="utf-8") as f:
            full[mod] = deps(mods, mod, f.read())
    top = {}
    for mod, ds in full.items():
        a = mod[:1]
        for d in ds:
            if d[:1] != a:
                top.setdefault(a, set()).add(d[:1])
        top.setdefault(a, set())
    bad = False
    for label, graph in (("top-level modules", top), ("all modules", full)):
        edges = sum(len(v) for v in graph.values())
        cycles = sccs({name(k): {name(d) for d in v} for k, v in graph.items()})
        print(f"{label}: {len(graph)} modules, {edges} edges, {len(cycles)} cycle(s)")
        for c in cycles:
            bad = True
            print("  cycle among: " + ", ".join(c))
    if "-v" in sys.argv or os.environ.get("VERBOSE"):
        for mod, ds in sorted(full.items()):
            print(f"{name(mod)} -> {', '.join(sorted(name(d) for d in ds))}")
    sys.exit(1 if bad else 0)


main()
