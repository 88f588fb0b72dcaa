#!/usr/bin/env python3
"""Generate backends/cpu/src/forward.rs: the `Cpu` backend's forwarding of every burn op to burn-ndarray.

`Cpu` shares burn-ndarray's tensor primitives, so forwarding is a plain call. This script reads the op
traits of burn-backend 0.21.0 and burn-ndarray 0.21.0's impls from the cargo registry and emits, for each
trait, every method that is required or that burn-ndarray overrides; those listed in OWN go to v4's own
kernels (`backends/cpu/src/kernels.rs`) instead. Re-run it when upgrading burn:

    python3 scripts/gen-cpu-forwarding.py > backends/cpu/src/forward.rs
"""
import glob, os, re

REG = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))[0]
TRAITS = REG + "burn-backend-0.21.0/src/backend/ops/"
NDARRAY = REG + "burn-ndarray-0.21.0/src/ops/"

# (trait, file in burn-backend, files of burn-ndarray's impl)
SPECS = [
    ("FloatTensorOps", "tensor.rs", ["tensor.rs"]),
    ("IntTensorOps", "int_tensor.rs", ["int_tensor.rs"]),
    ("BoolTensorOps", "bool_tensor.rs", ["bool_tensor.rs"]),
    ("ModuleOps", "modules/base.rs", ["module.rs"]),
    ("QTensorOps", "qtensor.rs", ["qtensor.rs"]),
    ("ActivationOps", "activation.rs", ["activation.rs"]),
    ("TransactionOps", "transaction.rs", ["transaction.rs"]),
]

# Result structs generic over the backend, with their fields.
STRUCTS = {
    "DeformConv2dBackward": ["x_grad", "offset_grad", "weight_grad", "mask_grad", "bias_grad"],
    "MaxPool1dBackward": ["x_grad"],
    "MaxPool1dWithIndices": ["output", "indices"],
    "MaxPool2dBackward": ["x_grad"],
    "MaxPool2dWithIndices": ["output", "indices"],
}

# Methods `Cpu` implements itself, and the kernel that does it.
OWN = {
    "float_matmul": "crate::kernels::matmul",
    "float_zeros": "crate::kernels::float_zeros",
    "float_full": "crate::kernels::float_full",
    "float_into_data": "crate::kernels::float_into_data",
    "float_reshape": "crate::kernels::float_reshape",
    "int_reshape": "crate::kernels::int_reshape",
    "float_slice": "crate::kernels::float_slice",
    "int_slice": "crate::kernels::int_slice",
    "float_exp": "crate::kernels::float_exp",
    "float_cat": "crate::kernels::float_cat",
    "float_max_dim": "crate::kernels::float_max_dim",
    "float_add": "crate::kernels::float_add",
    "float_sub": "crate::kernels::float_sub",
    "float_mul": "crate::kernels::float_mul",
    "float_div": "crate::kernels::float_div",
    "sigmoid": "crate::kernels::sigmoid",
}


def trait_methods(path, trait):
    src = open(path).read()
    start = src.index("pub trait %s<B: Backend>" % trait)
    body = src[src.index("{", start) + 1:]
    out, i, depth = [], 0, 0
    while i < len(body):
        c = body[i]
        if c == "}" and depth == 0:
            break
        m = re.compile(r"\n    fn (\w+)").match(body, i)
        if m and depth == 0:
            j, paren = m.end(), 0
            while True:
                ch = body[j]
                if ch in "([":
                    paren += 1
                elif ch in ")]":
                    paren -= 1
                elif ch in ";{" and paren == 0:
                    break
                j += 1
            sig = " ".join(body[m.start() + 1:j].split())
            out.append((m.group(1), sig, body[j] == ";"))
            i = j
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        i += 1
    return out


def split_args(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def forwarding(name, sig, target="Inner::%s"):
    open_paren = sig.index("(")
    depth, close = 0, open_paren
    for k in range(open_paren, len(sig)):
        if sig[k] == "(":
            depth += 1
        elif sig[k] == ")":
            depth -= 1
            if depth == 0:
                close = k
                break
    args = []
    for a in split_args(sig[open_paren + 1:close]):
        arg, ty = a.split(":", 1)
        # A struct generic over the backend: rebuild it for the inner backend.
        if ty.strip().startswith("QuantizationParametersPrimitive"):
            args.append("QuantizationParametersPrimitive { scales: %s.scales }" % arg.strip())
        else:
            args.append(arg.strip())
    generics = re.match(r"fn \w+<([^>]*)>", sig)
    turbofish = ""
    if generics:
        turbofish = "::<" + ", ".join(g.split(":")[0].strip() for g in split_args(generics.group(1))) + ">"
    sig = re.sub(r"\bB\b", "Self", sig).replace("crate::tensor::", "burn_backend::tensor::")
    sig = sig.replace("impl Future", "impl core::future::Future").replace("( ", "(").replace(", )", ")")
    call = (target.replace("%s", name)) + "%s(%s)" % (turbofish, ", ".join(args))
    # Result structs are generic over the backend: rebuild them field by field.
    result = re.search(r"-> (\w+)<Self>$", sig)
    if result and result.group(1) in STRUCTS:
        fields = ", ".join("%s: o.%s" % (f, f) for f in STRUCTS[result.group(1)])
        call = "let o = %s;\n        %s { %s }" % (call, result.group(1), fields)
    return "    %s {\n        %s\n    }\n" % (sig, call)


print("// Generated by scripts/gen-cpu-forwarding.py from burn-backend 0.21.0 and burn-ndarray 0.21.0: do not")
print("// edit by hand. Every op `Cpu` does not implement itself goes to burn-ndarray unchanged (the tensor")
print("// primitives are the same types, so forwarding is a plain call).\n")
print("use crate::{Cpu, Inner};")
print("use burn_backend::ops::*;")
print("use burn_backend::quantization::{QuantScheme, QuantizationParametersPrimitive};")
print("use burn_backend::tensor::*;")
print("use burn_backend::{")
print("    BoolDType, Distribution, ExecutionError, FloatDType, IntDType, Scalar, Shape, Slice, TensorData,")
print("};")
print()
for trait, tfile, nfiles in SPECS:
    methods = trait_methods(TRAITS + tfile, trait)
    nd = set()
    for f in nfiles:
        nd |= set(re.findall(r"fn (\w+)", open(NDARRAY + f).read()))
    print("impl %s<Self> for Cpu {" % trait)
    for name, sig, required in methods:
        if name in OWN:
            print(forwarding(name, sig, OWN[name]))
        elif required or name in nd:
            print(forwarding(name, sig))
    print("}\n")
