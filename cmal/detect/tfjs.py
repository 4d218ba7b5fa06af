"""A small PyTorch executor for TensorFlow.js graph models (``model.json`` + ``.bin``).

It reads the graph and its weights (float32, or float16/uint8 quantised) and evaluates the
nodes a requested output needs, in TensorFlow's layouts (NHWC images, HWIO kernels): each
op is a few lines of torch. Only the ops that the detectors we ship use are implemented;
any other op is a clear error naming it, so a new model fails at load time, not mid-image.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmal.data.errors import DataError

_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_TF_DTYPES = {"DT_FLOAT": torch.float32, "DT_INT32": torch.int32, "DT_BOOL": torch.bool}


def _attr(node: dict, key: str, default=None):
    """One attribute of a node, decoded (ints, floats, bools, strings and their lists)."""
    a = node.get("attr", {}).get(key)
    if a is None:
        return default
    if "list" in a:
        lst = a["list"]
        if "i" in lst:
            return [int(x) for x in lst["i"]]
        if "s" in lst:
            return [base64.b64decode(x).decode() for x in lst["s"]]
        return []
    if "i" in a:
        return int(a["i"])
    if "f" in a:
        return float(a["f"])
    if "b" in a:
        return bool(a["b"])
    if "s" in a:
        return base64.b64decode(a["s"]).decode()
    if "type" in a:
        return a["type"]
    return default


def load_weights(model_json: Path) -> dict[str, torch.Tensor]:
    """Every weight of the manifest, dequantised to its original dtype."""
    manifest = json.loads(model_json.read_text())["weightsManifest"]
    weights: dict[str, torch.Tensor] = {}
    for group in manifest:
        files = [model_json.parent / p for p in group["paths"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{model_json}: weight file(s) not found: {', '.join(missing)}")
        blob = b"".join(f.read_bytes() for f in files)
        offset = 0
        for w in group["weights"]:
            shape, q = w["shape"], w.get("quantization")
            count = math.prod(shape)
            if q is None:
                dtype = np.dtype(_DTYPES[w["dtype"]])
            else:
                dtype = np.dtype(
                    {"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}[q["dtype"]]
                )
            size = count * dtype.itemsize
            if offset + size > len(blob):
                raise DataError(
                    f"{model_json}: weight {w['name']} runs past the end of the .bin files"
                )
            raw = np.frombuffer(blob, dtype, count, offset).reshape(shape)
            offset += size
            if q is not None and q["dtype"] != "float16":
                raw = raw * q["scale"] + q["min"]
            weights[w["name"]] = torch.from_numpy(np.array(raw, _DTYPES[w["dtype"]]))
    return weights


def _same_pad(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0
):
    """TensorFlow's SAME padding (more on the bottom/right when odd) on an NCHW tensor."""
    pads = []
    for size, k, s in zip(x.shape[-2:], kernel, stride, strict=True):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom), value=value)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _conv(node: dict, x: torch.Tensor, w: torch.Tensor, depthwise: bool) -> torch.Tensor:
    if _attr(node, "data_format", "NHWC") != "NHWC":
        raise DataError(f"node {node['name']}: only NHWC convolutions are supported")
    _, sh, sw, _ = _attr(node, "strides", [1, 1, 1, 1])
    _, dh, dw, _ = _attr(node, "dilations", [1, 1, 1, 1])
    kh, kw, cin, cout = w.shape
    if depthwise:  # HW C M -> (C*M) 1 H W, one group per input channel
        weight, groups = w.permute(2, 3, 0, 1).reshape(cin * cout, 1, kh, kw), cin
    else:
        weight, groups = w.permute(3, 2, 0, 1), 1
    xin = _nchw(x)
    padding = _attr(node, "padding", "VALID")
    if padding == "SAME":
        xin = _same_pad(xin, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), (sh, sw))
    elif padding != "VALID":
        raise DataError(f"node {node['name']}: padding {padding} is not supported")
    y = F.conv2d(xin, weight.contiguous(), None, (sh, sw), 0, (dh, dw), groups)
    return _nhwc(y)


def _fused(node: dict, y: torch.Tensor, args: list[torch.Tensor]) -> torch.Tensor:
    for op in _attr(node, "fused_ops", []):
        if op == "BiasAdd":
            y = y + args[0]
        elif op == "Relu":
            y = F.relu(y)
        elif op == "Relu6":
            y = F.relu6(y)
        elif op == "Sigmoid":
            y = torch.sigmoid(y)
        elif op == "Prelu":
            y = torch.where(y > 0, y, y * args[1])
        else:
            raise DataError(f"node {node['name']}: fused op {op} is not supported")
    return y


def _resize_bilinear(node: dict, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """tf.image.resize_bilinear with its align_corners / half_pixel_centers conventions."""
    out_h, out_w = (int(v) for v in size.tolist())
    align, half = _attr(node, "align_corners", False), _attr(node, "half_pixel_centers", False)
    _, in_h, in_w, _ = x.shape

    def axis(n_in: int, n_out: int):
        scale = (n_in - 1) / (n_out - 1) if align and n_out > 1 else n_in / n_out
        pos = torch.arange(n_out, dtype=torch.float32)
        src = (pos + 0.5) * scale - 0.5 if half else pos * scale
        src = src.clamp(min=0)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).clamp(0, 1)

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    top = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    return top[:, :, x0] * (1 - wx)[None, None, :, None] + top[:, :, x1] * wx[None, None, :, None]


def _strided_slice(node: dict, x, begin, end, strides) -> torch.Tensor:
    begin, end, strides = begin.tolist(), end.tolist(), strides.tolist()
    bm, em = _attr(node, "begin_mask", 0), _attr(node, "end_mask", 0)
    shrink, new_axis = _attr(node, "shrink_axis_mask", 0), _attr(node, "new_axis_mask", 0)
    if _attr(node, "ellipsis_mask", 0) or new_axis:
        raise DataError(f"node {node['name']}: StridedSlice with ellipsis/new-axis masks")
    index: list = []
    for k, (b, e, s) in enumerate(zip(begin, end, strides, strict=True)):
        if shrink >> k & 1:
            index.append(b)
            continue
        index.append(slice(None if bm >> k & 1 else b, None if em >> k & 1 else e, s))
    if any(isinstance(i, slice) and (i.step or 1) < 0 for i in index):
        raise DataError(f"node {node['name']}: StridedSlice with negative strides")
    return x[tuple(index)]


def _mean(node, x, axes):
    return x.float().mean(
        dim=[int(a) for a in axes.reshape(-1).tolist()], keepdim=_attr(node, "keep_dims", False)
    )


_OPS: dict[str, Callable] = {
    "Identity": lambda n, x: x,
    "Add": lambda n, a, b: a + b,
    "AddV2": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Relu": lambda n, x: F.relu(x),
    "Relu6": lambda n, x: F.relu6(x),
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Equal": lambda n, a, b: a == b,
    "Cast": lambda n, x: x.to(_TF_DTYPES[_attr(n, "DstT")]),
    "FloorDiv": lambda n, a, b: torch.div(a, b, rounding_mode="floor"),
    "FloorMod": lambda n, a, b: torch.remainder(a, b),
    "Reshape": lambda n, x, shape: x.reshape([int(v) for v in shape.tolist()]),
    "ExpandDims": lambda n, x, dim: x.unsqueeze(int(dim)),
    "ConcatV2": lambda n, *xs: torch.cat(xs[:-1], dim=int(xs[-1])),
    "Mean": _mean,
    "StridedSlice": _strided_slice,
    "GatherV2": lambda n, x, idx, axis: x[(slice(None),) * int(axis) + (idx.long(),)],
    "TopKV2": lambda n, x, k: tuple(torch.topk(x, int(k), dim=-1, sorted=True)),
    "ResizeBilinear": _resize_bilinear,
    "Conv2D": lambda n, x, w: _conv(n, x, w, False),
    "DepthwiseConv2dNative": lambda n, x, w: _conv(n, x, w, True),
    "_FusedConv2D": lambda n, x, w, *args: _fused(n, _conv(n, x, w, False), list(args)),
    "FusedDepthwiseConv2dNative": lambda n, x, w, *args: _fused(
        n, _conv(n, x, w, True), list(args)
    ),
    "MaxPool": lambda n, x: _maxpool(n, x),
}


def _maxpool(node: dict, x: torch.Tensor) -> torch.Tensor:
    _, kh, kw, _ = _attr(node, "ksize")
    _, sh, sw, _ = _attr(node, "strides")
    xin = _nchw(x)
    if _attr(node, "padding") == "SAME":
        xin = _same_pad(xin, (kh, kw), (sh, sw), value=-math.inf)
    return _nhwc(F.max_pool2d(xin, (kh, kw), (sh, sw)))


class GraphModel:
    """A TensorFlow.js graph model, evaluated node by node with torch."""

    def __init__(self, model_json: str | Path):
        self.path = Path(model_json)
        if not self.path.is_file():
            raise DataError(f"graph model not found: {self.path}")
        spec = json.loads(self.path.read_text())
        if spec.get("format") != "graph-model":
            raise DataError(
                f"{self.path}: not a TensorFlow.js graph model (format {spec.get('format')!r})"
            )
        self.nodes = {n["name"]: n for n in spec["modelTopology"]["node"]}
        self.signature = spec.get("signature", {})
        unknown = sorted(
            {n["op"] for n in self.nodes.values()} - set(_OPS) - {"Const", "Placeholder"}
        )
        if unknown:
            raise DataError(
                f"{self.path}: ops not supported by cmal's executor: {', '.join(unknown)}"
            )
        self.consts = load_weights(self.path)
        missing = [k for k, n in self.nodes.items() if n["op"] == "Const" and k not in self.consts]
        if missing:
            raise DataError(f"{self.path}: constants without weights: {', '.join(missing[:5])}")

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        """Evaluate ``outputs`` (node names, ``name:k`` for a node's k-th output)."""
        values: dict[str, object] = dict(inputs)

        def ref(r: str):
            name, _, k = r.partition(":")
            v = values[name]
            return v[int(k or 0)] if isinstance(v, tuple) else v

        # Depth-first without recursion: the graph is deeper than Python's stack.
        stack = [o.partition(":")[0] for o in outputs]
        while stack:
            name = stack[-1]
            if name in values:
                stack.pop()
                continue
            if name in self.consts:
                values[name] = self.consts[name]
                continue
            node = self.nodes.get(name)
            if node is None:
                raise DataError(f"{self.path}: no node named {name!r}")
            if node["op"] == "Placeholder":
                raise DataError(f"{self.path}: input {name!r} was not given")
            deps = [i.partition(":")[0] for i in node.get("input", []) if not i.startswith("^")]
            todo = [d for d in deps if d not in values]
            if todo:
                stack.extend(todo)
                continue
            args = [ref(i) for i in node.get("input", []) if not i.startswith("^")]
            values[name] = _OPS[node["op"]](node, *args)
            stack.pop()
        return {o: ref(o) for o in outputs}
