#!/usr/bin/env python3
"""The library's public API as a sorted listing, one item a line, from rustdoc's JSON.

    RUSTC_BOOTSTRAP=1 RUSTDOCFLAGS="-Z unstable-options --output-format json" \
        cargo doc --no-deps --lib --target-dir target/api
    python3 tests/public_api.py target/api/doc/netbird_proxy.json > public-api.txt

The committed `public-api.txt` is the surface we mean to offer; `tests/run.sh` regenerates
it and fails on any difference, so a change to the surface is a deliberate, reviewed diff
(what `cargo public-api` does, without its nightly toolchain). Items are listed under the
path a user names them by (re-exports followed); inherent methods, public fields, enum
variants and trait impls of our own traits' kinds are listed with their types.
"""

import json
import sys


# Traits the compiler implements along with others: listing them says nothing new.
NOISE = {"StructuralPartialEq"}


def render_type(t):
    """A type as Rust source, close enough to review."""
    if t is None:
        return "()"
    (kind, v), = t.items()
    if kind == "primitive":
        return v
    if kind == "generic":
        return v
    if kind == "resolved_path":
        name = v["path"]
        args = v.get("args")
        return name + render_args(args)
    if kind == "borrowed_ref":
        lt = (v.get("lifetime") or "") + " " if v.get("lifetime") else ""
        mut = "mut " if v.get("is_mutable") else ""
        return f"&{lt}{mut}{render_type(v['type'])}"
    if kind == "slice":
        return f"[{render_type(v)}]"
    if kind == "array":
        return f"[{render_type(v['type'])}; {v['len']}]"
    if kind == "tuple":
        return "(" + ", ".join(render_type(x) for x in v) + ")"
    if kind == "impl_trait":
        return "impl " + " + ".join(render_bound(b) for b in v)
    if kind == "dyn_trait":
        return "dyn " + " + ".join(render_poly(p) for p in v["traits"])
    if kind == "qualified_path":
        return f"<{render_type(v['self_type'])}>::{v['name']}"
    if kind == "raw_pointer":
        return ("*mut " if v["is_mutable"] else "*const ") + render_type(v["type"])
    if kind == "function_pointer":
        return "fn(..)"
    return kind


def render_args(args):
    if not args:
        return ""
    if "angle_bracketed" in args:
        parts = []
        for a in args["angle_bracketed"]["args"]:
            if "type" in a:
                parts.append(render_type(a["type"]))
            elif "lifetime" in a:
                parts.append(a["lifetime"])
            elif "const" in a:
                parts.append(str(a["const"].get("expr", "_")))
        for c in args["angle_bracketed"].get("constraints", []):
            binding = c.get("binding", {})
            if "equality" in binding:
                parts.append(f"{c['name']} = {render_type(binding['equality'].get('type'))}")
            else:
                parts.append(c["name"])
        return "<" + ", ".join(parts) + ">" if parts else ""
    if "parenthesized" in args:
        p = args["parenthesized"]
        out = "(" + ", ".join(render_type(x) for x in p["inputs"]) + ")"
        if p.get("output"):
            out += " -> " + render_type(p["output"])
        return out
    return ""


def render_poly(p):
    return p["trait"]["path"] + render_args(p["trait"].get("args"))


def render_bound(b):
    if "trait_bound" in b:
        return render_poly(b["trait_bound"])
    if "outlives" in b:
        return b["outlives"]
    return "?"


def render_fn(name, f):
    sig = f["sig"]
    inputs = []
    for arg_name, ty in sig["inputs"]:
        if arg_name == "self":
            inputs.append(render_self(ty))
        else:
            inputs.append(f"{arg_name}: {render_type(ty)}")
    header = f["header"]
    prefix = "async fn" if header.get("is_async") else "fn"
    out = f"{prefix} {name}({', '.join(inputs)})"
    if sig.get("output"):
        out += " -> " + render_type(sig["output"])
    return out


def render_self(ty):
    s = render_type(ty)
    return {"Self": "self", "&Self": "&self", "&mut Self": "&mut self"}.get(s, f"self: {s}")


def main(path):
    doc = json.load(open(path))
    index = doc["index"]
    crate = doc["index"][str(doc["root"])]["name"]
    lines = set()

    def item(i):
        return index.get(str(i))

    def walk_module(mod, prefix):
        for i in mod["inner"]["module"]["items"]:
            it = item(i)
            if it is None or it["visibility"] != "public":
                continue
            inner = it["inner"]
            if "use" in inner:
                u = inner["use"]
                target = item(u["id"]) if u["id"] is not None else None
                if target is None:
                    lines.add(f"pub use {prefix}::{u['name']} = {u['source']}")
                    continue
                if u["is_glob"]:
                    walk_module(target, prefix)
                else:
                    emit(target, f"{prefix}::{u['name']}")
                continue
            emit(it, f"{prefix}::{it['name']}")

    def emit(it, path):
        (kind, v), = it["inner"].items()
        if kind == "module":
            lines.add(f"pub mod {path}")
            walk_module(it, path)
        elif kind == "struct":
            lines.add(f"pub struct {path}")
            plain = v["kind"].get("plain") if isinstance(v["kind"], dict) else None
            if plain:
                for f in plain["fields"]:
                    fi = item(f)
                    if fi and fi["visibility"] == "public":
                        lines.add(f"pub {path}::{fi['name']}: {render_type(fi['inner']['struct_field'])}")
            tup = v["kind"].get("tuple") if isinstance(v["kind"], dict) else None
            if tup:
                for n, f in enumerate(tup):
                    fi = item(f) if f is not None else None
                    if fi and fi["visibility"] == "public":
                        lines.add(f"pub {path}::{n}: {render_type(fi['inner']['struct_field'])}")
            impls(v["impls"], path)
        elif kind == "enum":
            lines.add(f"pub enum {path}")
            for var in v["variants"]:
                vi = item(var)
                fields = []
                vk = vi["inner"]["variant"]["kind"]
                if isinstance(vk, dict) and "struct" in vk:
                    for f in vk["struct"]["fields"]:
                        fi = item(f)
                        fields.append(f"{fi['name']}: {render_type(fi['inner']['struct_field'])}")
                    lines.add(f"pub {path}::{vi['name']} {{ {', '.join(fields)} }}")
                elif isinstance(vk, dict) and "tuple" in vk:
                    for f in vk["tuple"]:
                        fi = item(f)
                        fields.append(render_type(fi["inner"]["struct_field"]) if fi else "_")
                    lines.add(f"pub {path}::{vi['name']}({', '.join(fields)})")
                else:
                    lines.add(f"pub {path}::{vi['name']}")
            impls(v["impls"], path)
        elif kind == "function":
            lines.add(f"pub {render_fn(path, v)}")
        elif kind == "constant":
            lines.add(f"pub const {path}: {render_type(v['type'])}")
        elif kind == "type_alias":
            lines.add(f"pub type {path} = {render_type(v['type'])}")
        else:
            lines.add(f"pub {kind} {path}")

    def impls(ids, path):
        for i in ids:
            im = item(i)
            if im is None:
                continue
            imp = im["inner"]["impl"]
            if imp.get("is_synthetic") or imp.get("blanket_impl"):
                continue
            if imp["trait"] is None:
                for m in imp["items"]:
                    mi = item(m)
                    if mi and mi["visibility"] == "public" and "function" in mi["inner"]:
                        lines.add(f"pub {render_fn(path + '::' + mi['name'], mi['inner']['function'])}")
                    elif mi and mi["visibility"] == "public" and "constant" in mi["inner"]:
                        lines.add(f"pub const {path}::{mi['name']}")
            else:
                if imp["trait"]["path"] in NOISE:
                    continue
                trait = imp["trait"]["path"] + render_args(imp["trait"].get("args"))
                lines.add(f"impl {trait} for {path}")

    walk_module(index[str(doc["root"])], crate)
    for line in sorted(lines):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
