#!/usr/bin/env python3
"""Convert the published CommVQ codebooks (LLaMA-3.1-8B) into a .cvq file.

Inputs
  --keys DIR        key codebooks, one file per layer and KV head:
                    {layer:03d}_{head}.pt = {"steps": [{"theta": [128, P],
                    "clustering_centers": [4096, 2P], ...}, ...]} (one entry per
                    residual stage; row 2a of theta is the real part of sub-code
                    a, row 2a+1 its imaginary part; column p is RoPE pair p).
  --values PATH     the Hugging Face checkpoint holding each layer's value
                    compressor (a folder with model.safetensors[.index.json] or
                    pytorch_model.bin[.index.json], or one such file). Under each
                    layer's attention module: learnable_scale [F], norm1.weight
                    and .bias [F], enc1.weight [I, F] and .bias [I], out.weight
                    [2*Nc, I] and .bias [2*Nc], embedding [Nc, F].

Output: a version-1 .cvq file (docs/format.md) with the geometry the official
code uses: HF rotate_half pairs, one key scale per token (the paper's
prescale), one value group per token (F = Hkv*d), R = the number of steps.

Mapping (method note, sections 2 and 4):
  key_w[l][h][r][a][p] = (theta[2a][p], theta[2a+1][p])   (w = x + i*y)
  val_ls = learnable_scale, val_ln_* = norm1.*, val_w1/b1 = enc1.*,
  val_w2/b2 = out.*, val_E = embedding.
Every stage's explicit clustering_centers are checked against the structured
centres c(A,B)_p = (x_A - y_B, y_A + x_B) of code 64*A + B (pair p at dims p
and p + P) before anything is written.

.pt files are read without torch: a torch zip archive is a pickle (data.pkl)
plus one raw file per storage (data/N). The unpickler accepts only tensors,
storages and OrderedDict; any other global (code to run) is refused.

Requires numpy. Exit status 0 on success, 1 on a refused or unreadable input
(one line on stderr: 'convert_official: error: ...'), 2 on a usage error.
"""

import argparse
import collections
import io
import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib

import numpy as np


class ConvertError(Exception):
    """A refused or unreadable input; the message says what and where."""


# --------------------------------------------------------------------------
# Reading torch .pt / .bin files (zip archives) without torch
# --------------------------------------------------------------------------

class _StorageType:
    """Stands for torch.<X>Storage in a pickle: only names an element type.
    Not callable, so a pickle cannot use it to run anything."""

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype  # numpy dtype string, little-endian; 'bf16' special

    def __repr__(self):
        return "torch." + self.name


_STORAGE_TYPES = {
    name: _StorageType(name, dt)
    for name, dt in (
        ("FloatStorage", "<f4"),
        ("HalfStorage", "<f2"),
        ("BFloat16Storage", "bf16"),
        ("DoubleStorage", "<f8"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "<i1"),
        ("ByteStorage", "<u1"),
        ("BoolStorage", "<u1"),
    )
}


class _StorageRef:
    """One storage record of the archive (data/<key>). Read on each use and
    not kept, so a large shard is never held in memory at once."""

    def __init__(self, archive, stype, key, numel):
        self.archive = archive
        self.stype = stype
        self.key = key
        self.numel = numel

    def raw(self):
        raw = self.archive.read_storage(self.key)
        itemsize = 2 if self.stype.dtype == "bf16" else np.dtype(self.stype.dtype).itemsize
        if len(raw) < self.numel * itemsize:
            raise ConvertError(
                "%s: storage data/%s holds %d bytes, its record announces %d "
                "elements of %d bytes (truncated archive?)"
                % (self.archive.path, self.key, len(raw), self.numel, itemsize))
        return raw


class LazyTensor:
    """A tensor of a checkpoint: shape known at once, data read by numpy()."""

    def __init__(self, shape, dtype_name, loader):
        self.shape = tuple(int(s) for s in shape)
        self.dtype_name = dtype_name
        self._loader = loader

    def numpy(self):
        """The values as a new C-order array (float32 for bf16 sources)."""
        arr = self._loader()
        if arr.shape != self.shape:
            raise ConvertError("internal: tensor shape %s, read %s" % (self.shape, arr.shape))
        return arr


def _bf16_to_f32(u16):
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
    requires_grad, backward_hooks[, metadata]): a strided view of a storage."""
    if not isinstance(storage, _StorageRef):
        raise ConvertError("_rebuild_tensor_v2: first argument is not a storage record")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise ConvertError("_rebuild_tensor_v2: bad storage offset %r" % (storage_offset,))
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise ConvertError("_rebuild_tensor_v2: bad size/stride %r %r" % (size, stride))
    for v in size + stride:
        if not isinstance(v, int) or v < 0:
            raise ConvertError("_rebuild_tensor_v2: bad size/stride %r %r" % (size, stride))
    numel = 1
    for s in size:
        numel *= s
    last = storage_offset + sum((s - 1) * t for s, t in zip(size, stride)) if numel else 0
    if numel and last >= storage.numel:
        raise ConvertError(
            "%s: a tensor of size %s, stride %s at offset %d reads past the end of "
            "storage data/%s (%d elements)" % (storage.archive.path, size, stride,
                                               storage_offset, storage.key, storage.numel))

    def load():
        dt = storage.stype.dtype
        raw = storage.raw()
        big = storage.archive.big_endian
        if dt == "bf16":
            base = np.frombuffer(raw, dtype=">u2" if big else "<u2", count=storage.numel)
        else:
            base = np.frombuffer(raw, dtype=dt.replace("<", ">") if big else dt,
                                 count=storage.numel)
        if numel == 0:
            out = np.zeros(size, dtype=base.dtype)
        else:
            item = base.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(
                base[storage_offset:], shape=size, strides=tuple(t * item for t in stride),
                writeable=False)
            out = np.array(view, dtype=base.dtype.newbyteorder("="), order="C")
        return _bf16_to_f32(out) if dt == "bf16" else out

    return LazyTensor(size, storage.stype.name, load)


def _rebuild_parameter(data, *rest):
    """torch._utils._rebuild_parameter(data, requires_grad, hooks[, state])."""
    if not isinstance(data, LazyTensor):
        raise ConvertError("_rebuild_parameter: argument is not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
for _name, _st in _STORAGE_TYPES.items():
    _ALLOWED_GLOBALS[("torch", _name)] = _st


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles data.pkl of a torch archive, allowing only the globals above."""

    def __init__(self, fileobj, archive):
        super().__init__(fileobj, encoding="utf-8")
        self.archive = archive

    def find_class(self, module, name):
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise ConvertError(
                "%s: refused: the pickle references the global '%s.%s'; only torch "
                "tensors, storages and OrderedDict are accepted (loading anything "
                "else could run code)" % (self.archive.path, module, name))
        return fn

    def persistent_load(self, pid):
        # torch.save: ('storage', storage_type, key, location, numel)
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or not isinstance(pid[4], int) or pid[4] < 0):
            raise ConvertError("%s: unsupported persistent id %r in the pickle"
                               % (self.archive.path, pid))
        return self.archive.storage(pid[1], pid[2], pid[4])


class TorchArchive:
    """A torch zip archive (torch.save since 1.6): <prefix>/data.pkl and
    <prefix>/data/<key>, plus version and (torch >= 2.1) byteorder."""

    def __init__(self, path):
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise ConvertError(
                "%s: not a zip archive: a truncated file, or torch's legacy (pre-1.6) "
                "format; re-save it with a recent torch.save" % path) from None
        except OSError as e:
            raise ConvertError("%s: cannot open: %s" % (path, e)) from None
        pkls = [n for n in self.zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ConvertError("%s: not a torch archive (expected exactly one "
                               "<name>/data.pkl, found %d)" % (path, len(pkls)))
        self.prefix = pkls[0][: -len("data.pkl")]
        self.big_endian = False
        names = set(self.zf.namelist())
        if self.prefix + "byteorder" in names:
            order = self._read(self.prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise ConvertError("%s: unknown byteorder record %r" % (path, order))
            self.big_endian = order == "big"
        self._storages = {}

    def _read(self, member):
        try:
            return self.zf.read(member)
        except KeyError:
            raise ConvertError("%s: record %s is missing" % (self.path, member)) from None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise ConvertError("%s: cannot read record %s: %s" % (self.path, member, e)) from None

    def read_storage(self, key):
        return self._read(self.prefix + "data/" + key)

    def storage(self, stype, key, numel):
        ref = self._storages.get(key)
        if ref is None:
            ref = _StorageRef(self, stype, key, numel)
            self._storages[key] = ref
        return ref

    def load(self):
        """The unpickled object; tensors are LazyTensor."""
        data = self._read(self.prefix + "data.pkl")
        try:
            return _RestrictedUnpickler(io.BytesIO(data), self).load()
        except ConvertError:
            raise
        except Exception as e:  # malformed pickle: any unpickling error
            raise ConvertError("%s: cannot unpickle data.pkl: %s: %s"
                               % (self.path, type(e).__name__, e)) from None


# --------------------------------------------------------------------------
# safetensors (8-byte little-endian header length, JSON header, raw data)
# --------------------------------------------------------------------------

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bf16",
              "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "<i1", "U8": "<u1",
              "BOOL": "<u1"}


class SafetensorsFile:
    def __init__(self, path):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ConvertError("%s: truncated safetensors file (no header length)" % path)
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > (1 << 30):
                    raise ConvertError("%s: safetensors header length %d does not fit the "
                                       "file (%d bytes): truncated or not safetensors"
                                       % (path, n, size))
                text = f.read(n)
        except OSError as e:
            raise ConvertError("%s: cannot read: %s" % (path, e)) from None
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConvertError("%s: bad safetensors header: %s" % (path, e)) from None
        if not isinstance(header, dict):
            raise ConvertError("%s: bad safetensors header (not an object)" % path)
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dt = _ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                b, end = (int(v) for v in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConvertError("%s: bad safetensors entry for %s: %r" % (path, name, e)) from None
            item = 2 if dt == "bf16" else np.dtype(dt).itemsize
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if min(shape, default=0) < 0 or not 0 <= b <= end <= data_len or end - b != count * item:
                raise ConvertError(
                    "%s: tensor %s (%s %s) has data offsets [%d, %d) that do not fit "
                    "its shape or the file (%d data bytes): truncated or corrupt"
                    % (path, name, e["dtype"], list(shape), b, end, data_len))
            self.entries[name] = (dt, shape, b, end, e["dtype"])

    def names(self):
        return self.entries.keys()

    def tensor(self, name):
        dt, shape, b, end, dname = self.entries[name]

        def load():
            with open(self.path, "rb") as f:
                f.seek(self.data_start + b)
                raw = f.read(end - b)
            if len(raw) != end - b:
                raise ConvertError("%s: short read of %s" % (self.path, name))
            if dt == "bf16":
                return _bf16_to_f32(np.frombuffer(raw, dtype="<u2").reshape(shape))
            return np.frombuffer(raw, dtype=dt).reshape(shape).astype(
                np.dtype(dt).newbyteorder("="))

        return LazyTensor(shape, dname, load)


# --------------------------------------------------------------------------
# A Hugging Face checkpoint: index + shards (safetensors or torch zip)
# --------------------------------------------------------------------------

class Checkpoint:
    INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
    SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")

    def __init__(self, path):
        self.path = path
        self.dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
        self.weight_map = None  # name -> shard file (absolute)
        self._shards = {}
        if os.path.isdir(path):
            found = None
            for n in self.INDEX_NAMES + self.SINGLE_NAMES:
                if os.path.isfile(os.path.join(path, n)):
                    found = os.path.join(path, n)
                    break
            if found is None:
                raise ConvertError("%s: no %s in this folder" % (
                    path, " / ".join(self.INDEX_NAMES + self.SINGLE_NAMES)))
            path = found
        elif not os.path.isfile(path):
            raise ConvertError("%s: no such file or folder" % path)
        self.source = path
        if path.endswith(".json"):
            try:
                with open(path, "r", encoding="utf-8") as f:
                    index = json.load(f)
                wm = index["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConvertError("%s: bad checkpoint index: %s" % (path, e)) from None
            base = os.path.dirname(path)
            self.weight_map = {k: os.path.join(base, v) for k, v in wm.items()}
        else:
            shard = self._open(path)
            self.weight_map = {k: path for k in shard}

    def _open(self, shard_path):
        """name -> LazyTensor of one shard (headers only; data read on demand)."""
        got = self._shards.get(shard_path)
        if got is not None:
            return got
        if not os.path.isfile(shard_path):
            raise ConvertError("%s: shard named by the index is missing" % shard_path)
        if shard_path.endswith(".safetensors"):
            st = SafetensorsFile(shard_path)
            got = {n: st.tensor(n) for n in st.names()}
        else:
            obj = TorchArchive(shard_path).load()
            if not isinstance(obj, dict):
                raise ConvertError("%s: expected a state dict, found %s"
                                   % (shard_path, type(obj).__name__))
            got = {k: v for k, v in obj.items() if isinstance(v, LazyTensor)}
        self._shards[shard_path] = got
        return got

    def names(self):
        return self.weight_map.keys()

    def tensor(self, name):
        shard = self._open(self.weight_map[name])
        if name not in shard:
            raise ConvertError("%s: the index puts %s in this shard, which lacks it"
                               % (self.weight_map[name], name))
        return shard[name]


# Suffixes of a value compressor's parameters and the name of the library
# tensor each becomes.
VALUE_PARAMS = (
    ("learnable_scale", "val_ls"),
    ("norm1.weight", "val_ln_w"),
    ("norm1.bias", "val_ln_b"),
    ("enc1.weight", "val_w1"),
    ("enc1.bias", "val_b1"),
    ("out.weight", "val_w2"),
    ("out.bias", "val_b2"),
    ("embedding", "val_E"),
)

_ATTN_COMPONENT = re.compile(r"(attn|attention)", re.IGNORECASE)


def find_value_prefixes(ckpt, layers, template=None):
    """Per layer, the prefix P such that P + suffix names every value
    parameter; the compressor must sit under the layer's attention module."""
    names = set(ckpt.names())
    out = {}
    for l in layers:
        if template is not None:
            prefix = template.replace("{layer}", str(l))
            missing = [s for s, _ in VALUE_PARAMS if prefix + s not in names]
            if missing:
                raise ConvertError("layer %d: the value compressor '%s' lacks %s in %s"
                                   % (l, prefix, ", ".join(prefix + s for s in missing),
                                      ckpt.source))
            out[l] = prefix
            continue
        layer_tag = re.compile(r"(^|\.)layers\.%d\.(.*)$" % l)
        candidates = {}
        for n in names:
            m = layer_tag.search(n)
            if not m:
                continue
            rest = m.group(2)
            for s, _ in VALUE_PARAMS:
                if rest == s or rest.endswith("." + s):
                    inner = rest[: len(rest) - len(s)]  # module path inside the layer
                    if any(_ATTN_COMPONENT.search(c) for c in inner.split(".") if c):
                        prefix = n[: len(n) - len(s)]
                        candidates.setdefault(prefix, set()).add(s)
        complete = sorted(p for p, got in candidates.items() if len(got) == len(VALUE_PARAMS))
        if len(complete) == 1:
            out[l] = complete[0]
        elif len(complete) > 1:
            raise ConvertError(
                "layer %d: several modules under the attention hold value compressor "
                "parameters: %s; choose one with --value-prefix (e.g. '%s', with "
                "{layer} for the layer number)"
                % (l, ", ".join(complete), re.sub(r"layers\.%d\." % l, "layers.{layer}.",
                                                   complete[0], count=1)))
        elif candidates:
            best = max(candidates, key=lambda p: len(candidates[p]))
            missing = [best + s for s, _ in VALUE_PARAMS if s not in candidates[best]]
            raise ConvertError("layer %d: the value compressor '%s' in %s lacks: %s"
                               % (l, best, ckpt.source, ", ".join(missing)))
        else:
            raise ConvertError(
                "layer %d: no value compressor parameter (%s) under the layer's "
                "attention module in %s"
                % (l, ", ".join(s for s, _ in VALUE_PARAMS), ckpt.source))
    return out


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------

_KEY_FILE = re.compile(r"^(\d{3,})_(\d+)\.pt$")


def scan_key_files(keys_dir):
    """{layer: {head: path}} of the {layer:03d}_{head}.pt files."""
    try:
        entries = os.listdir(keys_dir)
    except OSError as e:
        raise ConvertError("%s: cannot list the key folder: %s" % (keys_dir, e)) from None
    files = {}
    for n in entries:
        m = _KEY_FILE.match(n)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = os.path.join(keys_dir, n)
    if not files:
        raise ConvertError("%s: no key files named {layer:03d}_{head}.pt" % keys_dir)
    return files


def load_key_steps(path):
    """[(theta [128, P] float64, centres [4096, 2P] float64, dtypes)] of one
    key file, with the shapes checked."""
    obj = TorchArchive(path).load()
    if not isinstance(obj, dict) or "steps" not in obj:
        raise ConvertError("%s: expected a dict with 'steps', found %s" % (
            path, sorted(obj.keys()) if isinstance(obj, dict) else type(obj).__name__))
    steps = obj["steps"]
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ConvertError("%s: 'steps' must be a non-empty list" % path)
    out = []
    for r, st in enumerate(steps):
        if not isinstance(st, dict):
            raise ConvertError("%s: steps[%d] is not a dict" % (path, r))
        for k in ("theta", "clustering_centers"):
            if k not in st:
                raise ConvertError("%s: steps[%d] has no '%s' (keys: %s)"
                                   % (path, r, k, ", ".join(sorted(map(str, st.keys())))))
            if not isinstance(st[k], LazyTensor):
                raise ConvertError("%s: steps[%d]['%s'] is not a tensor" % (path, r, k))
        th, cc = st["theta"], st["clustering_centers"]
        if len(th.shape) != 2 or th.shape[0] != 128 or th.shape[1] < 1:
            raise ConvertError("%s: steps[%d]['theta'] has shape %s, expected [128, P] "
                               "(rows 2a, 2a+1: real and imaginary parts of sub-code a)"
                               % (path, r, list(th.shape)))
        P = th.shape[1]
        if cc.shape != (4096, 2 * P):
            raise ConvertError("%s: steps[%d]['clustering_centers'] has shape %s, "
                               "expected [4096, %d] (theta is [128, %d])"
                               % (path, r, list(cc.shape), 2 * P, P))
        out.append((th.numpy().astype(np.float64), cc.numpy().astype(np.float64),
                    (th.dtype_name, cc.dtype_name)))
    return out


def structured_centres(theta, variant="ours"):
    """Centres [4096, 2P] of the 4096 codes for theta [128, P], pair p at dims
    (p, p + P) (rotate_half). 'ours': code 64*A + B = w_A + i*w_B, w_a =
    theta[2a] + i*theta[2a+1]. The other variants only name a mismatch."""
    if variant == "rows_half":
        x, y = theta[:64], theta[64:]
    else:
        x, y = theta[0::2], theta[1::2]  # [64, P]
    if variant == "conjugate":  # w_A - i*w_B
        re_, im_ = x[:, None, :] + y[None, :, :], y[:, None, :] - x[None, :, :]
    else:
        re_, im_ = x[:, None, :] - y[None, :, :], y[:, None, :] + x[None, :, :]
    if variant == "transposed":  # code A + 64*B
        re_, im_ = re_.transpose(1, 0, 2), im_.transpose(1, 0, 2)
    P = theta.shape[1]
    if variant == "interleaved":
        c = np.empty((64, 64, 2 * P))
        c[:, :, 0::2], c[:, :, 1::2] = re_, im_
        return c.reshape(4096, 2 * P)
    return np.concatenate([re_, im_], axis=2).reshape(4096, 2 * P)


_UNIT_ROUNDOFF = {"FloatStorage": 2.0 ** -24, "DoubleStorage": 2.0 ** -53,
                  "HalfStorage": 2.0 ** -11, "BFloat16Storage": 2.0 ** -8}


def check_centres(path, r, theta, centres, dtypes, tol):
    """Refuses unless the explicit centres equal the structured ones. Returns
    'exact' or 'transposed' (the same set of centres, codes numbered
    A + 64*B: harmless, codes are internal to the library)."""
    u = max(_UNIT_ROUNDOFF.get(d, 2.0 ** -8) for d in dtypes)
    limit_rel = tol if tol is not None else max(1e-4, 8.0 * u)
    scale = float(np.max(np.abs(centres)))
    if not np.isfinite(scale) or not np.all(np.isfinite(theta)):
        raise ConvertError("%s: steps[%d] holds NaN or infinity" % (path, r))
    limit = limit_rel * scale + 1e-30

    def err(variant):
        return float(np.max(np.abs(structured_centres(theta, variant) - centres)))

    e = err("ours")
    if e <= limit:
        return "exact"
    if err("transposed") <= limit:
        return "transposed"
    other = [v for v in ("interleaved", "conjugate", "rows_half") if err(v) <= limit]
    hint = {
        "interleaved": "pairs interleaved (x[2p], x[2p+1]) instead of HF rotate_half",
        "conjugate": "centres w_A - i*w_B instead of w_A + i*w_B",
        "rows_half": "sub-code a in theta rows (a, a+64) instead of (2a, 2a+1)",
    }
    raise ConvertError(
        "%s: steps[%d]: clustering_centers differ from the structured centres "
        "c(A,B)_p = (x_A - y_B, y_A + x_B) of theta (code 64*A + B, pair p at dims "
        "p and p+%d): max |difference| %.3g > %.3g (%.2g x max |centre| %.3g)%s; "
        "refusing to convert"
        % (path, r, theta.shape[1], e, limit, limit_rel, scale,
           ("; they match another convention: " + "; ".join(hint[v] for v in other))
           if other else "; no known convention matches"))


# --------------------------------------------------------------------------
# RoPE table
# --------------------------------------------------------------------------

def rope_theta_default(d, base):
    # 1 / base^(2p/d), in double: the library's expression (core/rope_freqs.c)
    return np.array([1.0 / math.pow(base, (2.0 * p) / d) for p in range(d // 2)])


def rope_theta_llama3(d, base, factor, low, high, original_max_pos):
    """HF's llama3 scaling, as cvq_rope_freqs_llama3 computes it."""
    if not (factor >= 1.0 and 0.0 < low < high and original_max_pos > 0.0):
        raise ConvertError("llama3 rope scaling needs factor >= 1, 0 < low_freq_factor < "
                           "high_freq_factor, original_max_position_embeddings > 0")
    th = rope_theta_default(d, base)
    low_wavelen = original_max_pos / low
    high_wavelen = original_max_pos / high
    two_pi = 6.283185307179586476925287
    for p in range(d // 2):
        inv = th[p]
        wavelen = two_pi / inv
        if wavelen < high_wavelen:
            continue
        if wavelen > low_wavelen:
            th[p] = inv / factor
            continue
        smooth = (original_max_pos / wavelen - low) / (high - low)
        th[p] = (1.0 - smooth) * inv / factor + smooth * inv
    return th


def rope_theta_from_config(cfg, d, source):
    base = float(cfg.get("rope_theta", 10000.0))
    sc = cfg.get("rope_scaling")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConvertError("%s: partial_rotary_factor != 1 is not supported" % source)
    if not sc:
        return rope_theta_default(d, base), "default base %g" % base
    kind = sc.get("rope_type", sc.get("type"))
    try:
        if kind in (None, "default"):
            return rope_theta_default(d, base), "default base %g" % base
        if kind == "linear":
            f = float(sc["factor"])
            if not f >= 1.0:
                raise ConvertError("%s: linear rope factor must be >= 1" % source)
            return rope_theta_default(d, base) / f, "linear base %g factor %g" % (base, f)
        if kind == "llama3":
            args = (float(sc["factor"]), float(sc["low_freq_factor"]),
                    float(sc["high_freq_factor"]),
                    float(sc["original_max_position_embeddings"]))
            return (rope_theta_llama3(d, base, *args),
                    "llama3 base %g factor %g low %g high %g original_max_pos %g"
                    % ((base,) + args))
    except KeyError as e:
        raise ConvertError("%s: rope_scaling lacks %s" % (source, e)) from None
    raise ConvertError("%s: rope scaling type %r is not computed here; pass the model's "
                       "table with --rope-theta FILE.npy (float64 [d/2])" % (source, kind))


# --------------------------------------------------------------------------
# The .cvq writer (docs/format.md, version 1)
# --------------------------------------------------------------------------

DT_F32, DT_F16, DT_F64, DT_TEXT, DT_U32 = 1, 2, 3, 4, 5
_DT_SIZE = {DT_F32: 4, DT_F16: 2, DT_F64: 8, DT_TEXT: 1, DT_U32: 4}
HEADER_SIZE, ENTRY_SIZE, ALIGN = 64, 112, 64


class Section:
    def __init__(self, name, dtype, shape, chunks):
        """chunks(): yields the section's values in row-major order, as numpy
        arrays (tensors) or bytes (geometry, rope_theta, note)."""
        assert 1 <= len(name) <= 31 and 1 <= len(shape) <= 6
        self.name, self.dtype, self.shape, self.chunks = name, dtype, tuple(shape), chunks
        self.size = int(np.prod(self.shape, dtype=np.int64)) * _DT_SIZE[dtype]
        self.offset = 0
        self.crc = 0


def _encode(sec, chunk):
    if isinstance(chunk, (bytes, bytearray)):
        return bytes(chunk)
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.asarray(chunk, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a.ravel()))[0])
        raise ConvertError("%s: a NaN or infinity (element %d of a layer's block), or a "
                           "value beyond float32" % (sec.name, bad))
    if sec.dtype == DT_F16:
        with np.errstate(over="ignore", invalid="ignore"):
            h = a.astype("<f2")
        if not np.all(np.isfinite(h)):
            bad = int(np.flatnonzero(~np.isfinite(h.ravel()))[0])
            raise ConvertError("%s: %g overflows float16; convert without --fp16"
                               % (sec.name, float(a.ravel()[bad])))
        return h.tobytes()
    return a.astype("<f4").tobytes()


def write_cvq(path, sections):
    """Writes the file through a temporary file renamed at the end, so a
    refused input leaves no partial output. Sections are streamed: the CRCs
    are computed while writing, the header and table are written last."""
    table_end = HEADER_SIZE + ENTRY_SIZE * len(sections)
    pos = table_end
    for s in sections:
        s.offset = (pos + ALIGN - 1) // ALIGN * ALIGN
        pos = s.offset + s.size
    file_size = pos
    out_dir = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".convert_official.", dir=out_dir)
    except OSError as e:
        raise ConvertError("cannot create a file in %s: %s" % (out_dir, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * table_end)
            here = table_end
            for s in sections:
                f.write(b"\0" * (s.offset - here))
                crc, n = 0, 0
                for chunk in s.chunks():
                    b = _encode(s, chunk)
                    crc = zlib.crc32(b, crc)
                    n += len(b)
                    f.write(b)
                if n != s.size:
                    raise ConvertError("internal: section %s has %d bytes, expected %d"
                                       % (s.name, n, s.size))
                s.crc = crc
                here = s.offset + s.size
            head = bytearray(table_end)
            head[0:8] = b"COMMVQCB"
            struct.pack_into("<IIII", head, 8, 1, HEADER_SIZE, ENTRY_SIZE, len(sections))
            struct.pack_into("<QQ", head, 24, HEADER_SIZE, file_size)
            for i, s in enumerate(sections):
                e = HEADER_SIZE + ENTRY_SIZE * i
                head[e:e + len(s.name)] = s.name.encode("ascii")
                dims = list(s.shape) + [0] * (6 - len(s.shape))
                struct.pack_into("<II6QQQII", head, e + 32, s.dtype, len(s.shape), *dims,
                                 s.offset, s.size, s.crc, 0)
            hcrc = zlib.crc32(bytes(head[HEADER_SIZE:table_end]), zlib.crc32(bytes(head[:60])))
            struct.pack_into("<I", head, 60, hcrc)
            f.seek(0)
            f.write(head)
        # mkstemp makes the file 0600; give it the usual mode
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConvertError("cannot write %s: %s" % (path, e)) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------

def parse_layers(text, available):
    if text in (None, "all"):
        return sorted(available)
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConvertError("--layers: cannot parse %r (use all, or e.g. 0,2,5-7)" % text)
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise ConvertError("--layers: empty range %r" % part.strip())
        out.extend(range(a, b + 1))
    if len(set(out)) != len(out):
        raise ConvertError("--layers: a layer is listed twice")
    return out


def load_config(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError("%s: cannot read the model config: %s" % (path, e)) from None
    if not isinstance(cfg, dict):
        raise ConvertError("%s: the model config is not a JSON object" % path)
    return cfg


def convert(args):
    key_files = scan_key_files(args.keys)
    layers = parse_layers(args.layers, key_files.keys())
    if args.layers in (None, "all") and layers != list(range(len(layers))):
        raise ConvertError("%s: key files for layers %s: not 0..L-1 (missing layers?); "
                           "choose layers with --layers" % (args.keys, layers))
    for l in layers:
        if l not in key_files:
            raise ConvertError("%s: no key files for layer %d (%03d_*.pt)" % (args.keys, l, l))
    hkv = len(key_files[layers[0]])
    for l in layers:
        if sorted(key_files[l]) != list(range(hkv)):
            raise ConvertError("%s: layer %d has key files for heads %s, expected 0..%d"
                               % (args.keys, l, sorted(key_files[l]), hkv - 1))

    # Keys: read, check and convert every file first (small: 3 MB per layer).
    L = len(layers)
    R = P = None
    key_w = None
    transposed = 0
    for li, l in enumerate(layers):
        for h in range(hkv):
            path = key_files[l][h]
            steps = load_key_steps(path)
            if R is None:
                R, P = len(steps), steps[0][0].shape[1]
                key_w = np.empty((L, hkv, R, 64, P, 2), dtype=np.float32)
            if len(steps) != R:
                raise ConvertError("%s: %d steps, other files have %d" % (path, len(steps), R))
            for r, (theta, centres, dtypes) in enumerate(steps):
                if theta.shape[1] != P:
                    raise ConvertError("%s: steps[%d]['theta'] is [128, %d], other files "
                                       "have [128, %d]" % (path, r, theta.shape[1], P))
                if check_centres(path, r, theta, centres, dtypes, args.centre_tol) == "transposed":
                    transposed += 1
                # rows 2a, 2a+1 -> (x, y) of sub-code a, for every pair p
                key_w[li, h, r] = theta.reshape(64, 2, P).transpose(0, 2, 1)
    d = 2 * P
    if R > 32:
        raise ConvertError("%d key steps: the library supports at most 32" % R)

    # Values: find every layer's compressor and check its shapes before
    # writing anything.
    ckpt = Checkpoint(args.values)
    prefixes = find_value_prefixes(ckpt, layers, args.value_prefix)
    E0 = ckpt.tensor(prefixes[layers[0]] + "embedding")
    if len(E0.shape) != 2:
        raise ConvertError("%sembedding has shape %s, expected [Nc, F]"
                           % (prefixes[layers[0]], list(E0.shape)))
    Nc, F = E0.shape
    W1 = ckpt.tensor(prefixes[layers[0]] + "enc1.weight")
    I = W1.shape[0] if len(W1.shape) == 2 else 0
    if F != hkv * d:
        raise ConvertError("%sembedding is [%d, %d]: the value group width F = %d must equal "
                           "Hkv*d = %d*%d (one compressor per token, as the paper)"
                           % (prefixes[layers[0]], Nc, F, F, hkv, d))
    if Nc % 8 != 0 or Nc < 8:
        raise ConvertError("Nc = %d value bits: must be a multiple of 8" % Nc)
    expected = {
        "learnable_scale": (F,), "norm1.weight": (F,), "norm1.bias": (F,),
        "enc1.weight": (I, F), "enc1.bias": (I,), "out.weight": (2 * Nc, I),
        "out.bias": (2 * Nc,), "embedding": (Nc, F),
    }
    for l in layers:
        for s, _ in VALUE_PARAMS:
            t = ckpt.tensor(prefixes[l] + s)
            # a [1, F] scale is the same F numbers: accept leading/trailing 1s
            if tuple(x for x in t.shape if x != 1) != tuple(x for x in expected[s] if x != 1) \
                    or int(np.prod(t.shape)) != int(np.prod(expected[s])):
                raise ConvertError("%s%s has shape %s, expected %s (F = %d, I = %d, Nc = %d)"
                                   % (prefixes[l], s, list(t.shape), list(expected[s]),
                                      F, I, Nc))

    # Model: Hq and RoPE from config.json (or the options).
    cfg = None
    cfg_path = args.config or os.path.join(ckpt.dir, "config.json")
    if args.config or os.path.isfile(cfg_path):
        cfg = load_config(cfg_path)
    hq = args.hq
    if hq is None and cfg is not None and "num_attention_heads" in cfg:
        hq = int(cfg["num_attention_heads"])
    if hq is None:
        raise ConvertError("the number of query heads is unknown: no config.json next to "
                           "the checkpoint; pass --hq N (or --config FILE)")
    if cfg is not None:
        cfg_hkv = int(cfg.get("num_key_value_heads", cfg.get("num_attention_heads", hkv)))
        if cfg_hkv != hkv:
            raise ConvertError("%s: num_key_value_heads = %d, the key files have %d heads"
                               % (cfg_path, cfg_hkv, hkv))
        cfg_d = cfg.get("head_dim") or (
            int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
            if "hidden_size" in cfg and "num_attention_heads" in cfg else d)
        if int(cfg_d) != d:
            raise ConvertError("%s: head_dim = %d, the key files have d = %d"
                               % (cfg_path, int(cfg_d), d))
        n_layers = cfg.get("num_hidden_layers")
        if n_layers is not None and max(layers) >= int(n_layers):
            raise ConvertError("%s: num_hidden_layers = %d, layer %d requested"
                               % (cfg_path, int(n_layers), max(layers)))
    if hq < hkv or hq % hkv != 0:
        raise ConvertError("Hq = %d query heads: must be a multiple of Hkv = %d" % (hq, hkv))
    if d not in (64, 80, 96, 128, 256):
        raise ConvertError("head dim d = %d: the library supports 64, 80, 96, 128, 256" % d)

    if args.rope_theta:
        try:
            theta = np.load(args.rope_theta, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConvertError("%s: cannot read: %s" % (args.rope_theta, e)) from None
        if theta.shape != (P,) or theta.dtype.kind != "f":
            raise ConvertError("%s: expected float [%d], found %s %s"
                               % (args.rope_theta, P, theta.dtype, list(theta.shape)))
        theta = theta.astype(np.float64)
        rope_text = "table from %s" % os.path.basename(args.rope_theta)
    elif args.rope_base is not None:
        theta = rope_theta_default(d, args.rope_base)
        rope_text = "default base %g" % args.rope_base
    elif cfg is not None:
        theta, rope_text = rope_theta_from_config(cfg, d, cfg_path)
    else:
        raise ConvertError("the RoPE table is unknown: no config.json next to the "
                           "checkpoint; pass --rope-theta FILE.npy, --rope-base X or "
                           "--config FILE")
    if not np.all(np.isfinite(theta)):
        raise ConvertError("the RoPE table holds NaN or infinity")

    lam = np.float32(args.logit_scale) if args.logit_scale else np.float32(1.0 / math.sqrt(d))
    if not (np.isfinite(lam) and lam > 0):
        raise ConvertError("--logit-scale must be finite and > 0")

    note = ("converted by tools/convert_official.py from the official CommVQ codebooks: "
            "keys %s (%d steps), values %s (%s), layers %s, RoPE %s"
            % (os.path.abspath(args.keys), R, os.path.abspath(ckpt.source),
               ", ".join(sorted(set(re.sub(r"layers\.\d+\.", "layers.{layer}.", p)
                                    for p in prefixes.values()))),
               ",".join(map(str, layers)), rope_text))
    if transposed:
        note += ("; %d key stages list their centres with code index A + 64*B "
                 "(the same set of centres)" % transposed)
    if args.note:
        note += "; " + args.note
    note_b = note.encode("utf-8")
    if b"\0" in note_b:
        raise ConvertError("--note must not hold a NUL character")

    geom = struct.pack("<10I", L, hq, hkv, d, R, 0, 0, F, Nc, I) + lam.astype("<f4").tobytes()
    tdt = DT_F16 if args.fp16 else DT_F32

    def values_of(suffix, shape):
        def chunks():
            for l in layers:
                a = ckpt.tensor(prefixes[l] + suffix).numpy().reshape(shape)
                if a.dtype.kind != "f":
                    raise ConvertError("%s%s is %s, not floating point"
                                       % (prefixes[l], suffix, a.dtype))
                if not np.all(np.isfinite(a)):
                    bad = np.unravel_index(int(np.flatnonzero(~np.isfinite(a))[0]), a.shape)
                    raise ConvertError("%s%s holds %s at %s" % (
                        prefixes[l], suffix, a[bad], list(map(int, bad))))
                yield a
        return chunks

    sections = [
        Section("geometry", DT_U32, (11,), lambda: [geom]),
        Section("rope_theta", DT_F64, (P,), lambda: [theta.astype("<f8").tobytes()]),
    ]
    if note_b:
        sections.append(Section("note", DT_TEXT, (len(note_b),), lambda: [note_b]))
    sections.append(Section("key_w", tdt, (L, hkv, R, 64, P, 2), lambda: [key_w]))
    for s, name in VALUE_PARAMS:
        shape = expected[s]
        sections.append(Section(name, tdt, (L, 1) + shape, values_of(s, shape)))
    write_cvq(args.out, sections)
    # The writer emits sections in the library's order: geometry, rope_theta,
    # note, key_w, val_ls, val_ln_w, val_ln_b, val_w1, val_b1, val_w2, val_b2,
    # val_E (VALUE_PARAMS is in that order).
    return dict(L=L, hq=hq, hkv=hkv, d=d, R=R, F=F, Nc=Nc, I=I, transposed=transposed,
                layers=layers, prefixes=prefixes)


def verify_with_tool(tool, out_path, info):
    """Loads the written file with the library (commvq export-codebook: the
    loader checks every CRC, shape and value) and prints its geometry."""
    with tempfile.TemporaryDirectory(prefix="convert_official.") as tmp:
        r = subprocess.run([tool, "export-codebook", out_path, "--npy-dir", tmp],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ConvertError("the library refuses the written file: %s"
                               % (r.stderr.strip() or r.stdout.strip()))
        with open(os.path.join(tmp, "geometry.tsv"), "r", encoding="utf-8") as f:
            geo = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    want = {"n_layers": info["L"], "n_q_heads": info["hq"], "n_kv_heads": info["hkv"],
            "head_dim": info["d"], "key_stages": info["R"], "value_bits": info["Nc"],
            "value_group_width": info["F"], "value_hidden": info["I"]}
    for k, v in want.items():
        if geo.get(k) != str(v):
            raise ConvertError("the library reads %s = %s, written %s" % (k, geo.get(k), v))
    print("verified with %s: loads, bits per element %s" % (tool, geo.get("bits_per_element")))


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="convert_official.py",
        description="Convert the published CommVQ codebooks (key .pt files and the value "
                    "compressors of a Hugging Face checkpoint) into a .cvq file.")
    ap.add_argument("--keys", required=True, metavar="DIR",
                    help="folder of {layer:03d}_{head}.pt key codebooks")
    ap.add_argument("--values", required=True, metavar="CHECKPOINT",
                    help="checkpoint folder (or index / .safetensors / .bin file) with the "
                         "value compressors")
    ap.add_argument("--out", required=True, metavar="FILE", help="output .cvq")
    ap.add_argument("--layers", default="all", metavar="LIST",
                    help="all (default: every layer of --keys, 0..L-1) or e.g. 0,2,5-7; "
                         "file layer i is the i-th listed")
    ap.add_argument("--fp16", action="store_true", help="store tensors as float16")
    ap.add_argument("--note", default="", help="text appended to the provenance note")
    ap.add_argument("--config", metavar="FILE",
                    help="model config.json (default: the checkpoint's)")
    ap.add_argument("--hq", type=int, help="query heads (default: from config.json)")
    ap.add_argument("--rope-theta", metavar="FILE.npy",
                    help="RoPE table, float64 [d/2] (default: from config.json)")
    ap.add_argument("--rope-base", type=float, metavar="X",
                    help="RoPE base without scaling: theta_p = X^(-2p/d)")
    ap.add_argument("--logit-scale", type=float, metavar="S",
                    help="attention logit scale (default 1/sqrt(d))")
    ap.add_argument("--value-prefix", metavar="TEMPLATE",
                    help="exact parameter prefix of the value compressor, {layer} for the "
                         "layer (default: found in the checkpoint's index)")
    ap.add_argument("--centre-tol", type=float, metavar="X",
                    help="allowed max |centre difference| relative to max |centre| "
                         "(default 1e-4 for float32 files, 8 units of rounding otherwise)")
    ap.add_argument("--verify", metavar="COMMVQ",
                    help="load the written file with this commvq tool (export-codebook)")
    args = ap.parse_args(argv)
    try:
        info = convert(args)
        print("wrote %s: L=%d Hq=%d Hkv=%d d=%d R=%d F=%d Nc=%d I=%d (%s)"
              % (args.out, info["L"], info["hq"], info["hkv"], info["d"], info["R"],
                 info["F"], info["Nc"], info["I"], "fp16" if args.fp16 else "fp32"))
        if info["transposed"]:
            print("note: %d key stages number their centres A + 64*B; the set of centres "
                  "is the same, so the conversion is exact" % info["transposed"],
                  file=sys.stderr)
        if args.verify:
            verify_with_tool(args.verify, args.out, info)
    except ConvertError as e:
        print("convert_official: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
