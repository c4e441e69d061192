#!/usr/bin/env python3
"""Tests of tools/convert_official.py (official CommVQ codebooks -> .cvq).

The fixtures are written here: torch zip archives by a minimal writer of the
layout torch.save produces (<name>/data.pkl pickled with protocol 2, storages
as persistent ids ('storage', torch.<X>Storage, key, location, numel),
<name>/data/<key>, <name>/version, <name>/byteorder), safetensors files and
HF indexes; with real torch importable, torch.save files too. The converted
file is read back through the library (`commvq export-codebook`, whose loader
checks every CRC, shape and value) and by this test's own parser of the
format; expected values come from the fixture, never from the converter.

Needs numpy; the commvq tool path in COMMVQ_TOOL (set by ctest). Seed:
CONVERT_TEST_SEED (default 20261129), printed on failure.
"""

import collections
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.normpath(os.path.join(HERE, os.pardir, "tools", "convert_official.py"))
TOOL = os.environ.get("COMMVQ_TOOL")
SEED = int(os.environ.get("CONVERT_TEST_SEED", "20261129"))

try:
    import torch  # only for the optional real-torch fixtures
except ImportError:
    torch = None

# Fixture geometry: the official d = 128 (theta [128, 64]), small otherwise.
L_, HKV, HQ, D, R_, NC, I_ = 2, 2, 4, 128, 2, 16, 32
P_ = D // 2
F_ = HKV * D
VPREFIX = "model.layers.%d.self_attn.v_compressor."


# --------------------------------------------------------------------------
# Minimal torch.save writer
# --------------------------------------------------------------------------

def f32_to_bf16_bits(a):
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


class FxTensor:
    """A tensor to write: a 1-D storage and a strided view of it."""
    NP = {"FloatStorage": "<f4", "HalfStorage": "<f2", "DoubleStorage": "<f8",
          "BFloat16Storage": "<u2"}

    def __init__(self, values, stype="FloatStorage", transposed=False, pad=0, parameter=False):
        """values: the logical array. transposed: a 2-D tensor stored
        column-major (stride (1, rows)); pad: unused storage elements before
        it (storage offset). Returns the values as torch would read them."""
        v = np.asarray(values, dtype=np.float64)
        if stype == "BFloat16Storage":
            bits = f32_to_bf16_bits(v.astype(np.float32))
            self.expected = bf16_bits_to_f32(bits).reshape(v.shape)
            src = bits
        else:
            src = v.astype(self.NP[stype])
            self.expected = src.astype(np.float32)
        self.stype = stype
        self.shape = v.shape
        if transposed:
            assert v.ndim == 2
            flat = src.T.reshape(-1)
            self.stride = (1, v.shape[0])
        else:
            flat = src.reshape(-1)
            self.stride = tuple(int(np.prod(v.shape[i + 1:])) for i in range(v.ndim))
        self.offset = pad
        self.storage = np.concatenate([np.zeros(pad, dtype=flat.dtype), flat])
        self.parameter = parameter


class Raw:
    """Raw pickle opcodes spliced into the stream (to write hostile pickles)."""

    def __init__(self, data):
        self.data = data


class PickleWriter:
    """Protocol-2 pickle of dicts, lists, tuples, str, int, float, bool, None
    and FxTensor, as torch.save's pickler emits them."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.storages = []  # (key, FxTensor)

    def glob(self, module, name):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def emit(self, o):
        w = self.out
        if isinstance(o, Raw):
            w += o.data
        elif o is None:
            w += b"N"
        elif o is True or o is False:
            w += b"\x88" if o else b"\x89"
        elif isinstance(o, int):
            w += b"J" + struct.pack("<i", o)
        elif isinstance(o, float):
            w += b"G" + struct.pack(">d", o)
        elif isinstance(o, str):
            b = o.encode("utf-8")
            w += b"X" + struct.pack("<I", len(b)) + b
        elif isinstance(o, list):
            w += b"]("
            for x in o:
                self.emit(x)
            w += b"e"
        elif isinstance(o, tuple):
            w += b"("
            for x in o:
                self.emit(x)
            w += b"t"
        elif isinstance(o, collections.OrderedDict):
            # OrderedDict.__reduce__: (cls, ()), items by SETITEMS, then its
            # __dict__ (a state dict's _metadata) by BUILD
            self.glob("collections", "OrderedDict")
            w += b")R("
            for k, v in o.items():
                self.emit(k)
                self.emit(v)
            w += b"u"
            w += b"}("
            self.emit("_metadata")
            self.glob("collections", "OrderedDict")
            w += b")R"
            w += b"ub"
        elif isinstance(o, dict):
            w += b"}("
            for k, v in o.items():
                self.emit(k)
                self.emit(v)
            w += b"u"
        elif isinstance(o, FxTensor):
            if o.parameter:
                self.glob("torch._utils", "_rebuild_parameter")
                w += b"("
            self.glob("torch._utils", "_rebuild_tensor_v2")
            key = str(len(self.storages))
            self.storages.append((key, o))
            w += b"(("
            self.emit("storage")
            self.glob("torch", o.stype)
            self.emit(key)
            self.emit("cpu")
            self.emit(int(o.storage.size))
            w += b"tQ"  # TUPLE, BINPERSID
            self.emit(int(o.offset))
            self.emit(tuple(int(s) for s in o.shape))
            self.emit(tuple(int(s) for s in o.stride))
            self.emit(False)
            self.glob("collections", "OrderedDict")
            w += b")R"
            w += b"tR"  # TUPLE, REDUCE
            if o.parameter:
                self.emit(True)
                self.glob("collections", "OrderedDict")
                w += b")R"
                w += b"tR"
        else:
            raise TypeError(type(o))

    def finish(self, o):
        self.emit(o)
        self.out += b"."
        return bytes(self.out)


def write_pt(path, obj, archive_name="archive", pickle_bytes=None, short_storage=False):
    """A torch-format zip: <archive_name>/data.pkl, data/<key>, version,
    byteorder, every record stored uncompressed as torch does."""
    pw = PickleWriter()
    data = pickle_bytes if pickle_bytes is not None else pw.finish(obj)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(archive_name + "/data.pkl", data)
        z.writestr(archive_name + "/byteorder", "little")
        for key, t in pw.storages:
            raw = t.storage.tobytes()
            if short_storage:
                raw = raw[: len(raw) // 2]
            z.writestr(archive_name + "/data/" + key, raw)
        z.writestr(archive_name + "/version", "3\n")


# --------------------------------------------------------------------------
# Minimal safetensors writer
# --------------------------------------------------------------------------

def write_safetensors(path, tensors):
    """tensors: name -> (array float32, 'F32'|'F16'|'BF16'). Returns name ->
    the float32 values a reader must find."""
    header, blobs, expected, off = {}, [], {}, 0
    for name, (arr, dt) in tensors.items():
        a = np.asarray(arr, dtype=np.float32)
        if dt == "BF16":
            bits = f32_to_bf16_bits(a)
            raw, expected[name] = bits.astype("<u2").tobytes(), bf16_bits_to_f32(bits).reshape(a.shape)
        elif dt == "F16":
            h = a.astype("<f2")
            raw, expected[name] = h.tobytes(), h.astype(np.float32)
        else:
            raw, expected[name] = a.astype("<f4").tobytes(), a
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    return expected


# --------------------------------------------------------------------------
# Fixture content (expected values built here, independently)
# --------------------------------------------------------------------------

def centres_of(theta, convention="ours"):
    """Explicit centres [4096, D] of theta [128, P], written as the method
    note states them: code k = 64*A + B, sub-code a = theta[2a] + i*theta[2a+1],
    c_p(A, B) = (x_A - y_B, y_A + x_B) at dims p (real) and p + P (imaginary)."""
    t = np.asarray(theta, dtype=np.float64)
    P = t.shape[1]
    c = np.zeros((4096, 2 * P))
    for A in range(64):
        for B in range(64):
            xA, yA, xB, yB = t[2 * A], t[2 * A + 1], t[2 * B], t[2 * B + 1]
            if convention == "conjugate":       # w_A - i*w_B
                re_, im_ = xA + yB, yA - xB
            else:
                re_, im_ = xA - yB, yA + xB
            k = A + 64 * B if convention == "transposed" else 64 * A + B
            if convention == "interleaved":
                c[k, 0::2], c[k, 1::2] = re_, im_
            else:
                c[k, :P], c[k, P:] = re_, im_
    return c


_CENTRE_CACHE = {}


def key_steps(rng, stype="FloatStorage", convention="ours"):
    """One key file's steps and the expected key_w [R][64][P][2]."""
    steps, kw = [], np.zeros((R_, 64, P_, 2), dtype=np.float32)
    for r in range(R_):
        theta = rng.standard_normal((128, P_)) * (0.3 / (r + 1))
        th = FxTensor(theta, stype)
        tv = th.expected.astype(np.float64)  # the values as stored
        for a in range(64):
            for p in range(P_):
                kw[r, a, p, 0] = tv[2 * a, p]
                kw[r, a, p, 1] = tv[2 * a + 1, p]
        ckey = (tv.tobytes(), convention)
        if ckey not in _CENTRE_CACHE:
            _CENTRE_CACHE[ckey] = centres_of(tv, convention)
        cc = FxTensor(_CENTRE_CACHE[ckey], stype)
        steps.append({"theta": th, "clustering_centers": cc, "loss": 0.01 * (r + 1),
                      "iters": 40 + r})
    return steps, kw


def value_params(rng):
    """One layer's value compressor, by parameter suffix."""
    return {
        "learnable_scale": np.abs(rng.standard_normal(F_)) + 0.1,
        "norm1.weight": 1.0 + 0.1 * rng.standard_normal(F_),
        "norm1.bias": 0.1 * rng.standard_normal(F_),
        "enc1.weight": rng.standard_normal((I_, F_)) / 16,
        "enc1.bias": 0.1 * rng.standard_normal(I_),
        "out.weight": rng.standard_normal((2 * NC, I_)) / 6,
        "out.bias": 0.1 * rng.standard_normal(2 * NC),
        "embedding": rng.standard_normal((NC, F_)) / 16,
    }


LIB_NAMES = [("learnable_scale", "val_ls"), ("norm1.weight", "val_ln_w"),
             ("norm1.bias", "val_ln_b"), ("enc1.weight", "val_w1"), ("enc1.bias", "val_b1"),
             ("out.weight", "val_w2"), ("out.bias", "val_b2"), ("embedding", "val_E")]

LLAMA31_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": HQ * D, "num_attention_heads": HQ,
    "num_key_value_heads": HKV, "num_hidden_layers": 4, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def llama3_oracle(d, base, factor, low, high, old_ctx):
    """HF transformers' _compute_llama3_parameters, vectorised, in float64."""
    inv_freq = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    inv_l = np.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, inv_l)


class Fixture:
    """Key files and a value checkpoint in root; expected tensors."""

    def __init__(self, root, seed, key_stype="FloatStorage", convention="ours"):
        rng = np.random.default_rng(seed)
        self.root = root
        self.keys = os.path.join(root, "keys")
        os.makedirs(self.keys)
        self.key_w = np.zeros((L_, HKV, R_, 64, P_, 2), dtype=np.float32)
        self.key_objs = {}
        for l in range(L_):
            for h in range(HKV):
                steps, kw = key_steps(rng, key_stype, convention)
                self.key_w[l, h] = kw
                obj = {"steps": steps, "config": {"bits": 1}}
                self.key_objs[(l, h)] = obj
                write_pt(os.path.join(self.keys, "%03d_%d.pt" % (l, h)), obj,
                         archive_name="%03d_%d" % (l, h))
        self.vals = [value_params(rng) for _ in range(L_)]

    def expected_values(self, got):
        """{lib name: [L, 1, ...]} from the values a reader finds, got[l][suffix]."""
        return {lib: np.stack([got[l][s] for l in range(L_)])[:, None]
                for s, lib in LIB_NAMES}

    def write_sharded_safetensors(self, dirname, bf16_layer=1, extra=None, drop=None,
                                  reshape=None, config=True):
        """model-0000N-of-00002.safetensors + index; layer bf16_layer's
        embedding and out.weight in BF16, layer 0's norm1.bias in F16; decoys
        (k_proj, an mlp 'out.weight' outside attention) as a real checkpoint
        would have."""
        ck = os.path.join(self.root, dirname)
        os.makedirs(ck)
        wm, got = {}, [{} for _ in range(L_)]
        for l in range(L_):
            t = {}
            for s, v in self.vals[l].items():
                dt = "F32"
                if l == bf16_layer and s in ("embedding", "out.weight"):
                    dt = "BF16"
                if l == 0 and s == "norm1.bias":
                    dt = "F16"
                if reshape and (l, s) in reshape:
                    v = reshape[(l, s)](v)
                if drop and (l, s) in drop:
                    continue
                t[VPREFIX % l + s] = (v, dt)
            t["model.layers.%d.self_attn.k_proj.weight" % l] = (np.ones((HKV * D, 8)), "BF16")
            t["model.layers.%d.mlp.out.weight" % l] = (np.ones((3, 3)), "F32")
            if extra:
                for name, v in extra(l).items():
                    t[name] = (v, "F32")
            fname = "model-%05d-of-%05d.safetensors" % (l + 1, L_)
            exp = write_safetensors(os.path.join(ck, fname), t)
            for name in t:
                wm[name] = fname
            for s in self.vals[l]:
                if VPREFIX % l + s in exp:
                    got[l][s] = exp[VPREFIX % l + s]
        with open(os.path.join(ck, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
        if config:
            with open(os.path.join(ck, "config.json"), "w") as f:
                json.dump(LLAMA31_CONFIG, f)
        return ck, got


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def run_convert(*args):
    r = subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def export(cvq, outdir):
    r = subprocess.run([TOOL, "export-codebook", cvq, "--npy-dir", outdir],
                       capture_output=True, text=True, timeout=120)
    return r


def read_tsv(path):
    with open(path) as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


def parse_cvq(path):
    """This test's own reader of docs/format.md: checks the header, the table,
    alignment, zero gaps and every CRC; returns name -> (dtype, shape, bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"COMMVQCB", "magic"
    ver, hsize, esize, n = struct.unpack_from("<IIII", data, 8)
    toff, fsize = struct.unpack_from("<QQ", data, 24)
    assert (ver, hsize, esize, toff) == (1, 64, 112, 64)
    assert fsize == len(data), "file size %d, header says %d" % (len(data), fsize)
    assert data[40:60] == b"\0" * 20, "reserved header bytes"
    table_end = 64 + 112 * n
    (hcrc,) = struct.unpack_from("<I", data, 60)
    assert hcrc == zlib.crc32(data[64:table_end], zlib.crc32(data[:60])), "header CRC"
    out, covered = {}, []
    sizes = {1: 4, 2: 2, 3: 8, 4: 1, 5: 4}
    for i in range(n):
        e = 64 + 112 * i
        name = data[e:e + 32].rstrip(b"\0").decode("ascii")
        assert data[e:e + 32] == name.encode() + b"\0" * (32 - len(name))
        dtype, rank = struct.unpack_from("<II", data, e + 32)
        dims = struct.unpack_from("<6Q", data, e + 40)
        off, size, crc, res = struct.unpack_from("<QQII", data, e + 88)
        assert 1 <= rank <= 6 and all(x == 0 for x in dims[rank:]) and res == 0
        assert off % 64 == 0, "%s at %d" % (name, off)
        assert size == int(np.prod(dims[:rank])) * sizes[dtype]
        body = data[off:off + size]
        assert zlib.crc32(body) == crc, "CRC of %s" % name
        out[name] = (dtype, tuple(dims[:rank]), body)
        covered.append((off, off + size))
    covered.sort()
    pos = table_end
    for a, b in covered:
        assert a >= pos and data[pos:a] == b"\0" * (a - pos), "gap before %d" % a
        pos = b
    assert pos == len(data), "file ends where its last section ends"
    return out


@unittest.skipIf(TOOL is None, "COMMVQ_TOOL is not set (ctest sets it)")
class ConvertOfficialTest(unittest.TestCase):
    maxDiff = 2000

    @classmethod
    def setUpClass(cls):
        base = os.environ.get("COMMVQ_TEST_TMP") or tempfile.gettempdir()
        cls.tmp = tempfile.mkdtemp(prefix="convert_official.", dir=base)
        cls.fx = Fixture(os.path.join(cls.tmp, "fx"), SEED)
        cls.ck, cls.got = cls.fx.write_sharded_safetensors("ckpt")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        self.work = tempfile.mkdtemp(dir=self.tmp)

    def fail_msg(self, what):
        return "%s (seed %d; CONVERT_TEST_SEED reproduces)" % (what, SEED)

    def assert_refused(self, rc, err, *parts):
        self.assertEqual(rc, 1, self.fail_msg("expected a refusal, stderr: " + err))
        self.assertTrue(err.startswith("convert_official: error: "), err)
        self.assertNotIn("Traceback", err)
        for p in parts:
            self.assertIn(p, err, self.fail_msg("message lacks %r" % p))

    def exported(self, cvq):
        d = os.path.join(self.work, "npy")
        r = export(cvq, d)
        self.assertEqual(r.returncode, 0, "the library refuses the file: " + r.stderr)
        return d, {n[:-4]: np.load(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".npy")}

    def check_tensors(self, arrays, key_w, values, fp16=False):
        rnd = (lambda a: a.astype(np.float16).astype(np.float32)) if fp16 else (lambda a: a)
        self.assertEqual(arrays["key_w"].shape, (L_, HKV, R_, 64, P_, 2))
        np.testing.assert_array_equal(arrays["key_w"], rnd(key_w), self.fail_msg("key_w"))
        for lib, want in values.items():
            self.assertEqual(arrays[lib].shape, want.shape, lib)
            np.testing.assert_array_equal(arrays[lib], rnd(want.astype(np.float32)),
                                          self.fail_msg(lib))

    def check_centres(self, key_w, fixture):
        """Centres rebuilt from the library's key_w (format.md: code 64*A + B
        = (x_A - y_B, y_A + x_B), pair p at dims p, p + P) equal the
        fixture's explicit clustering_centers."""
        for l in range(L_):
            for h in range(HKV):
                for r in range(R_):
                    w = key_w[l, h, r].astype(np.float64)  # [64][P][2]
                    x, y = w[:, :, 0], w[:, :, 1]
                    c = np.concatenate([x[:, None] - y[None], y[:, None] + x[None]], axis=2)
                    want = fixture.key_objs[(l, h)]["steps"][r]["clustering_centers"].expected
                    err = np.max(np.abs(c.reshape(4096, D) - want))
                    self.assertLess(err, 1e-6 * np.max(np.abs(want)),
                                    self.fail_msg("centres l%d h%d r%d" % (l, h, r)))

    # ---- conversions that must succeed ----------------------------------

    def test_sharded_safetensors_llama3_config(self):
        out = os.path.join(self.work, "o.cvq")
        rc, so, err = run_convert("--keys", self.fx.keys, "--values", self.ck, "--out", out,
                                  "--note", "fixture run", "--verify", TOOL)
        self.assertEqual(rc, 0, err)
        self.assertIn("verified with", so)
        d, arrays = self.exported(out)
        self.check_tensors(arrays, self.fx.key_w, self.fx.expected_values(self.got))
        self.check_centres(arrays["key_w"], self.fx)
        geo = read_tsv(os.path.join(d, "geometry.tsv"))
        want = {"n_layers": "2", "n_q_heads": str(HQ), "n_kv_heads": str(HKV),
                "head_dim": str(D), "key_stages": str(R_), "key_scale": "token",
                "pair_layout": "rotate_half", "value_group_width": str(F_),
                "value_groups": "1", "value_bits": str(NC), "value_hidden": str(I_)}
        for k, v in want.items():
            self.assertEqual(geo[k], v, k)
        self.assertAlmostEqual(float(geo["logit_scale"]), 1 / math.sqrt(D), places=7)
        theta = arrays["rope_theta"]
        self.assertEqual(theta.dtype, np.float64)
        want_t = llama3_oracle(D, 500000.0, 8.0, 1.0, 4.0, 8192.0)
        np.testing.assert_allclose(theta, want_t, rtol=1e-13, atol=0)
        self.assertLess(theta[-1], 1.0 / 500000.0 ** ((D - 2) / D))  # scaled band present
        with open(os.path.join(d, "note.txt")) as f:
            note = f.read()
        self.assertIn("fixture run", note)
        self.assertIn("llama3", note)
        self.assertIn("self_attn.v_compressor.", note)
        # This test's own reader: header and section CRCs, alignment, gaps.
        secs = parse_cvq(out)
        self.assertEqual(list(secs)[:3], ["geometry", "rope_theta", "note"])
        self.assertEqual(list(secs)[3:], ["key_w"] + [lib for _, lib in LIB_NAMES])
        geom = struct.unpack("<10If", secs["geometry"][2])
        self.assertEqual(geom[:10], (L_, HQ, HKV, D, R_, 0, 0, F_, NC, I_))
        np.testing.assert_array_equal(np.frombuffer(secs["rope_theta"][2], "<f8"), theta)

    def test_flipped_byte_is_refused_by_the_library(self):
        out = os.path.join(self.work, "o.cvq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", self.ck, "--out", out)
        self.assertEqual(rc, 0, err)
        secs = parse_cvq(out)
        with open(out, "rb") as f:
            data = bytearray(f.read())
        # the library checks the CRCs it is given: one flipped bit in val_E
        # (its CRC not updated) makes the file refused
        off = data.find(secs["val_E"][2])
        data[off + 5] ^= 0x10
        bad = os.path.join(self.work, "bad.cvq")
        with open(bad, "wb") as f:
            f.write(data)
        r = export(bad, os.path.join(self.work, "npy_bad"))
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("val_E", r.stderr)

    def test_fp16_single_bin_half_keys_options(self):
        fx = Fixture(os.path.join(self.work, "fx16"), SEED + 1, key_stype="HalfStorage")
        # pytorch_model.bin: an OrderedDict state dict; enc1.weight stored
        # transposed (strided), embedding at a storage offset, norm1.weight
        # an nn.Parameter, layer 1 in bfloat16
        sd = collections.OrderedDict()
        got = [{} for _ in range(L_)]
        for l in range(L_):
            for s, v in fx.vals[l].items():
                t = FxTensor(v, "BFloat16Storage" if l == 1 else "FloatStorage",
                             transposed=(s == "enc1.weight"), pad=7 if s == "embedding" else 0,
                             parameter=(s == "norm1.weight"))
                sd[VPREFIX % l + s] = t
                got[l][s] = t.expected
            sd["model.layers.%d.self_attn.q_proj.weight" % l] = FxTensor(np.zeros((4, 4)))
        ck = os.path.join(fx.root, "ckbin")
        os.makedirs(ck)
        write_pt(os.path.join(ck, "pytorch_model.bin"), sd, archive_name="pytorch_model")
        out = os.path.join(self.work, "o16.cvq")
        rc, _, err = run_convert("--keys", fx.keys, "--values", ck, "--out", out, "--fp16",
                                 "--hq", HQ, "--rope-base", 500000)
        self.assertEqual(rc, 0, err)
        secs = parse_cvq(out)
        self.assertEqual(secs["key_w"][0], 2)  # f16
        self.assertEqual(secs["rope_theta"][0], 3)  # f64 always
        d, arrays = self.exported(out)
        self.check_tensors(arrays, fx.key_w, fx.expected_values(got), fp16=True)
        np.testing.assert_allclose(
            arrays["rope_theta"], 1.0 / 500000.0 ** (np.arange(0, D, 2) / D), rtol=1e-14)

    def test_transposed_code_index_is_the_same_codebook(self):
        fx = Fixture(os.path.join(self.work, "fxT"), SEED + 2, convention="transposed")
        out = os.path.join(self.work, "oT.cvq")
        rc, _, err = run_convert("--keys", fx.keys, "--values", self.ck, "--out", out)
        self.assertEqual(rc, 0, err)
        self.assertIn("A + 64*B", err)
        _, arrays = self.exported(out)
        np.testing.assert_array_equal(arrays["key_w"], fx.key_w)

    def test_layers_subset_from_one_safetensors_file(self):
        # --values names one .safetensors file (it holds layer 1 only) and
        # --config the model config; the file's layer 0 is model layer 1
        out = os.path.join(self.work, "o1.cvq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--out", out, "--layers", "1",
                                 "--values", os.path.join(self.ck, "model-00002-of-00002.safetensors"),
                                 "--config", os.path.join(self.ck, "config.json"))
        self.assertEqual(rc, 0, err)
        d, arrays = self.exported(out)
        self.assertEqual(read_tsv(os.path.join(d, "geometry.tsv"))["n_layers"], "1")
        np.testing.assert_array_equal(arrays["key_w"], self.fx.key_w[1:2])
        for s, lib in LIB_NAMES:
            np.testing.assert_array_equal(arrays[lib][0, 0], self.got[1][s], lib)
        rc, _, err = run_convert("--keys", self.fx.keys, "--out", out, "--layers", "0-1",
                                 "--values", os.path.join(self.ck, "model-00002-of-00002.safetensors"),
                                 "--config", os.path.join(self.ck, "config.json"))
        self.assert_refused(rc, err, "layer 0: no value compressor parameter")

    # ---- refusals ------------------------------------------------------

    def assert_no_output(self, out):
        self.assertFalse(os.path.exists(out), "a refused conversion left " + out)
        self.assertEqual([n for n in os.listdir(os.path.dirname(out))
                          if n.startswith(".convert_official.")], [])

    def test_missing_value_name(self):
        ck, _ = self.fx.write_sharded_safetensors("ck_missing", drop={(1, "enc1.bias")})
        out = os.path.join(self.work, "o.cvq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out)
        self.assert_refused(rc, err, "layer 1", VPREFIX % 1 + "enc1.bias", "lacks")
        self.assert_no_output(out)

    def test_no_compressor_at_all(self):
        ck, _ = self.fx.write_sharded_safetensors(
            "ck_none", drop={(1, s) for s, _ in LIB_NAMES})
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "layer 1", "no value compressor parameter")

    def test_wrong_value_shapes(self):
        for (l, s), f, expect in [
                ((1, "out.bias"), lambda v: np.concatenate([v, v[:4]]), "out.bias has shape [36]"),
                ((0, "enc1.weight"), lambda v: v[:, :F_ - 2], "embedding")]:
            ck, _ = self.fx.write_sharded_safetensors("ck_shape_%d_%s" % (l, s),
                                                      reshape={(l, s): f})
            out = os.path.join(self.work, "o.cvq")
            rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out)
            self.assert_refused(rc, err, "has shape", VPREFIX % l + s if l == 1 else s)
            self.assert_no_output(out)

    def test_nonfinite_and_fp16_overflow(self):
        def nan_at(v):
            v = v.copy()
            v[3, 5] = np.nan
            return v
        ck, _ = self.fx.write_sharded_safetensors("ck_nan", reshape={(1, "out.weight"): nan_at})
        out = os.path.join(self.work, "o.cvq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out)
        self.assert_refused(rc, err, VPREFIX % 1 + "out.weight holds nan at [3, 5]")
        self.assert_no_output(out)

        def big(v):
            v = v.copy()
            v[2] = 70000.0
            return v
        ck, _ = self.fx.write_sharded_safetensors("ck_big", reshape={(0, "enc1.bias"): big})
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out, "--fp16")
        self.assert_refused(rc, err, "val_b1: 70000 overflows float16")
        self.assert_no_output(out)
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out)
        self.assertEqual(rc, 0, err)  # fine in float32

    def test_embedding_width_must_cover_all_heads(self):
        ck, _ = self.fx.write_sharded_safetensors(
            "ck_F", reshape={(l, s): (lambda v: v[..., :D] if v.shape[-1] == F_ else v)
                             for l in range(L_) for s, _ in LIB_NAMES})
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "F = %d must equal Hkv*d" % D)

    def test_ambiguous_compressor_needs_value_prefix(self):
        # a second complete compressor under the attention (e.g. one for keys)
        other = "model.layers.%d.self_attn.k_compressor."
        rng = np.random.default_rng(SEED + 3)
        decoy = [value_params(rng) for _ in range(L_)]
        ck, got = self.fx.write_sharded_safetensors(
            "ck_amb", extra=lambda l: {other % l + s: v for s, v in decoy[l].items()})
        out = os.path.join(self.work, "o.cvq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out)
        self.assert_refused(rc, err, "--value-prefix", other % 0, VPREFIX % 0)
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out,
                                 "--value-prefix", "model.layers.{layer}.self_attn.v_compressor.")
        self.assertEqual(rc, 0, err)
        _, arrays = self.exported(out)
        self.check_tensors(arrays, self.fx.key_w, self.fx.expected_values(got))

    def copy_keys(self, name):
        k = os.path.join(self.work, name)
        shutil.copytree(self.fx.keys, k)
        return k

    def test_wrong_key_shapes(self):
        k = self.copy_keys("keys_shape")
        obj = dict(self.fx.key_objs[(1, 0)])
        steps = [dict(s) for s in obj["steps"]]
        steps[1]["theta"] = FxTensor(np.zeros((126, P_)))
        write_pt(os.path.join(k, "001_0.pt"), {"steps": steps})
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "001_0.pt", "steps[1]['theta'] has shape [126, 64]")
        steps[1]["theta"] = obj["steps"][1]["theta"]
        steps[1]["clustering_centers"] = FxTensor(np.zeros((4096, D - 2)))
        write_pt(os.path.join(k, "001_0.pt"), {"steps": steps})
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "clustering_centers'] has shape [4096, 126]")
        write_pt(os.path.join(k, "001_0.pt"), {"steps": steps[:1]})
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "001_0.pt: 1 steps, other files have 2")

    def test_missing_key_file(self):
        k = self.copy_keys("keys_missing")
        os.unlink(os.path.join(k, "001_1.pt"))
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "layer 1 has key files for heads [0]")

    def test_disallowed_globals(self):
        marker = os.path.join(self.work, "pwned")
        cmd = "touch " + marker
        evil = (b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd.encode()
                + b"\x85R.")
        k = self.copy_keys("keys_evil")
        write_pt(os.path.join(k, "000_1.pt"), None, pickle_bytes=evil)
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "000_1.pt", "refused", "'os.system'")
        self.assertFalse(os.path.exists(marker), "the pickle's code ran")
        # nested inside an otherwise valid file: builtins.eval
        steps = [dict(s) for s in self.fx.key_objs[(0, 0)]["steps"]]
        steps[0]["hook"] = Raw(b"cbuiltins\neval\nX\x04\x00\x00\x001+1,\x85R")
        write_pt(os.path.join(k, "000_1.pt"), {"steps": steps})
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "'builtins.eval'")
        # the same for a checkpoint shard (.bin)
        ck = os.path.join(self.work, "ck_evil")
        os.makedirs(ck)
        write_pt(os.path.join(ck, "pytorch_model.bin"), None, pickle_bytes=evil)
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "pytorch_model.bin", "'os.system'")
        self.assertFalse(os.path.exists(marker), "the pickle's code ran")

    def test_truncated_files(self):
        k = self.copy_keys("keys_trunc")
        path = os.path.join(k, "001_1.pt")
        size = os.path.getsize(path)
        for cut in (size - 1, size // 2, 30):
            with open(os.path.join(self.fx.keys, "001_1.pt"), "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[:cut])
            rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                     os.path.join(self.work, "o.cvq"))
            self.assert_refused(rc, err, "001_1.pt", "not a zip archive")
        # a storage record shorter than its announced element count
        write_pt(path, self.fx.key_objs[(1, 1)], short_storage=True)
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "001_1.pt", "truncated")
        # a truncated safetensors shard
        ck = os.path.join(self.work, "ck_trunc")
        shutil.copytree(self.ck, ck)
        shard = os.path.join(ck, "model-00002-of-00002.safetensors")
        with open(shard, "rb") as f:
            data = f.read()
        with open(shard, "wb") as f:
            f.write(data[:-100])
        out = os.path.join(self.work, "o.cvq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out)
        self.assert_refused(rc, err, "model-00002-of-00002.safetensors", "truncated")
        self.assert_no_output(out)

    def test_centres_of_another_convention_are_refused(self):
        for conv, words in (("conjugate", "w_A - i*w_B"),
                            ("interleaved", "interleaved")):
            fx = Fixture(os.path.join(self.work, "fx_" + conv), SEED + 4, convention=conv)
            out = os.path.join(self.work, "o.cvq")
            rc, _, err = run_convert("--keys", fx.keys, "--values", self.ck, "--out", out)
            self.assert_refused(rc, err, "000_0.pt: steps[0]: clustering_centers differ",
                                words, "refusing")
            self.assert_no_output(out)

    def test_perturbed_centre_is_refused(self):
        k = self.copy_keys("keys_perturbed")
        steps = [dict(s) for s in self.fx.key_objs[(1, 1)]["steps"]]
        cc = steps[1]["clustering_centers"].expected.astype(np.float64).copy()
        cc[1234, 77] += 1e-2 * np.max(np.abs(cc))
        steps[1]["clustering_centers"] = FxTensor(cc)
        write_pt(os.path.join(k, "001_1.pt"), {"steps": steps})
        rc, _, err = run_convert("--keys", k, "--values", self.ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "001_1.pt: steps[1]", "no known convention matches")

    def test_needs_hq_and_rope_without_config(self):
        ck, _ = self.fx.write_sharded_safetensors("ck_nocfg", config=False)
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out",
                                 os.path.join(self.work, "o.cvq"))
        self.assert_refused(rc, err, "--hq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out",
                                 os.path.join(self.work, "o.cvq"), "--hq", HQ)
        self.assert_refused(rc, err, "--rope-theta")
        theta = llama3_oracle(D, 500000.0, 8.0, 1.0, 4.0, 8192.0)
        tp = os.path.join(self.work, "theta.npy")
        np.save(tp, theta)
        out = os.path.join(self.work, "o.cvq")
        rc, _, err = run_convert("--keys", self.fx.keys, "--values", ck, "--out", out,
                                 "--hq", HQ, "--rope-theta", tp)
        self.assertEqual(rc, 0, err)
        _, arrays = self.exported(out)
        np.testing.assert_array_equal(arrays["rope_theta"], theta)


LIB = os.environ.get("COMMVQ_LIB")


@unittest.skipIf(LIB is None or not LIB.endswith((".so", ".dylib", ".dll")),
                 "COMMVQ_LIB (the shared library) is not set")
class RopeTableTest(unittest.TestCase):
    """The converter's RoPE tables equal the library's own, bit for bit."""

    def test_tables_equal_the_library(self):
        import ctypes
        sys.path.insert(0, os.path.dirname(SCRIPT))
        sys.dont_write_bytecode = True  # no __pycache__ in the source tree
        try:
            import convert_official as co
        finally:
            sys.path.pop(0)
        lib = ctypes.CDLL(LIB)
        dp = ctypes.POINTER(ctypes.c_double)
        lib.cvq_rope_freqs_llama3.argtypes = [ctypes.c_uint32] + [ctypes.c_double] * 5 + [dp]
        lib.cvq_rope_freqs_default.argtypes = [ctypes.c_uint32, ctypes.c_double, dp]
        lib.cvq_rope_freqs_linear.argtypes = [ctypes.c_uint32, ctypes.c_double,
                                              ctypes.c_double, dp]
        for d in (64, 128, 256):
            for args in ((500000.0, 8.0, 1.0, 4.0, 8192.0), (10000.0, 4.0, 1.0, 2.0, 4096.0)):
                out = (ctypes.c_double * (d // 2))()
                self.assertEqual(lib.cvq_rope_freqs_llama3(d, *args, out), 0)
                np.testing.assert_array_equal(co.rope_theta_llama3(d, *args), np.array(out[:]))
            out = (ctypes.c_double * (d // 2))()
            self.assertEqual(lib.cvq_rope_freqs_default(d, 500000.0, out), 0)
            np.testing.assert_array_equal(co.rope_theta_default(d, 500000.0), np.array(out[:]))
            self.assertEqual(lib.cvq_rope_freqs_linear(d, 10000.0, 4.0, out), 0)
            cfg = {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
            np.testing.assert_array_equal(co.rope_theta_from_config(cfg, d, "cfg")[0],
                                          np.array(out[:]))


@unittest.skipIf(TOOL is None or torch is None, "needs COMMVQ_TOOL and torch")
class RealTorchFilesTest(unittest.TestCase):
    """The same conversion from files written by torch.save itself."""

    def test_torch_save_files(self):
        base = os.environ.get("COMMVQ_TEST_TMP") or tempfile.gettempdir()
        tmp = tempfile.mkdtemp(prefix="convert_official_torch.", dir=base)
        try:
            rng = np.random.default_rng(SEED + 5)
            keys = os.path.join(tmp, "keys")
            os.makedirs(keys)
            kw = np.zeros((L_, HKV, R_, 64, P_, 2), dtype=np.float32)
            for l in range(L_):
                for h in range(HKV):
                    steps = []
                    for r in range(R_):
                        theta = torch.tensor(rng.standard_normal((128, P_)), dtype=torch.float32)
                        tv = theta.numpy().astype(np.float64)
                        kw[l, h, r] = tv.reshape(64, 2, P_).transpose(0, 2, 1)
                        cc = torch.tensor(centres_of(tv), dtype=torch.float32)
                        steps.append({"theta": torch.nn.Parameter(theta),
                                      "clustering_centers": cc, "mse": 0.5})
                    torch.save({"steps": steps}, os.path.join(keys, "%03d_%d.pt" % (l, h)))
            sd, got = collections.OrderedDict(), [{} for _ in range(L_)]
            for l in range(L_):
                for s, v in value_params(rng).items():
                    t = torch.tensor(v, dtype=torch.bfloat16 if l else torch.float32)
                    if s == "enc1.weight":
                        t = t.t().contiguous().t()  # column-major storage
                    sd[VPREFIX % l + s] = t
                    got[l][s] = t.float().numpy()
            ck = os.path.join(tmp, "ck")
            os.makedirs(ck)
            torch.save(sd, os.path.join(ck, "pytorch_model-00001-of-00001.bin"))
            with open(os.path.join(ck, "pytorch_model.bin.index.json"), "w") as f:
                json.dump({"weight_map": {n: "pytorch_model-00001-of-00001.bin" for n in sd}}, f)
            with open(os.path.join(ck, "config.json"), "w") as f:
                json.dump(LLAMA31_CONFIG, f)
            out = os.path.join(tmp, "o.cvq")
            rc, _, err = run_convert("--keys", keys, "--values", ck, "--out", out)
            self.assertEqual(rc, 0, err)
            npy = os.path.join(tmp, "npy")
            r = export(out, npy)
            self.assertEqual(r.returncode, 0, r.stderr)
            np.testing.assert_array_equal(np.load(os.path.join(npy, "key_w.npy")), kw)
            for s, lib in LIB_NAMES:
                want = np.stack([got[l][s] for l in range(L_)])[:, None]
                np.testing.assert_array_equal(np.load(os.path.join(npy, lib + ".npy")), want, lib)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print("# convert_official test, seed %d (CONVERT_TEST_SEED)" % SEED)
    unittest.main(verbosity=2)
