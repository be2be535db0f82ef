#!/usr/bin/env python3
# Copied from shared/hooks/modcycles.py (the team's tool) so CI runs it from the project.
"""Module import cycles in a Rust crate's src/: prints each strongly connected set of files.

A file's edges are the crate paths it names (`use crate::a::b`, `crate::a::b::f()`,
`super::x` resolved against the file's module). Children importing their parent module
(`super::`) count too; a parent importing its own child does not close a cycle by itself.
Usage: modcycles.py [SRC_DIR]   (exit 1 when a cycle of 2+ files exists)
"""
import os, re, sys

src = sys.argv[1] if len(sys.argv) > 1 else "src"
files = {}
for root, _, names in os.walk(src):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            files[tuple(rel)] = p

def resolve(mod_path):
    """Longest prefix of mod_path that is a file module."""
    for k in range(len(mod_path), 0, -1):
        if tuple(mod_path[:k]) in files:
            return tuple(mod_path[:k])
    return None

edges = {m: set() for m in files}
tok = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
brace = re.compile(r"\buse\s+(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\}", re.S)
for m, p in files.items():
    text = open(p, encoding="utf-8", errors="replace").read()
    text = re.sub(r"//[^\n]*", "", text)
    # the file's own module path, used to resolve `super`
    is_dir_mod = os.path.basename(p) in ("mod.rs", "lib.rs", "main.rs")
    parent = list(m) if is_dir_mod else list(m[:-1])
    targets = []
    for head, tail in tok.findall(text):
        parts = [x for x in tail.split("::") if x]
        base = [] if head == "crate" else parent[:-1] if is_dir_mod else parent
        if head == "super" and not is_dir_mod:
            base = parent
        targets.append(base + parts)
    for head, tail, inner in brace.findall(text):
        base = [] if head == "crate" else (parent[:-1] if is_dir_mod else parent)
        pre = [x for x in tail.split("::") if x]
        for item in re.split(r"[,\s]+", inner):
            item = item.strip().split("::")[0]
            if item and item not in ("self",) and re.match(r"[A-Za-z_]", item):
                targets.append(base + pre + [item])
    for t in targets:
        r = resolve(t)
        if r is not None and r != m and r != ():
            # a module naming its own descendant is containment, not a dependency cycle source
            if r[:len(m)] == m and len(m) > 0:
                continue
            edges[m].add(r)

# Tarjan SCC
index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def strong(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        out.append(comp)
for v in files:
    if v not in index:
        strong(v)
cycles = [c for c in out if len(c) > 1]
name = lambda m: "/".join(m) or "lib"
for c in cycles:
    names = sorted(name(x) for x in c)
    print(f"cycle of {len(c)} modules: " + ", ".join(names))
    for a in sorted(c):
        for b in sorted(edges[a] & set(c)):
            print(f"  {name(a)} -> {name(b)}")
print(f"{len(files)} modules, {sum(len(e) for e in edges.values())} edges, {len(cycles)} cycles, "
      f"largest {max((len(c) for c in cycles), default=0)}")
sys.exit(1 if cycles else 0)
