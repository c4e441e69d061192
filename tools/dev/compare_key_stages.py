"""Checks that two codebooks hold the same key sub-codes (key_w) in every layer, bit for bit.

usage: python3 tools/dev/compare_key_stages.py A.cvq B.cvq [LIB]

Used by scripts/train-smollm2.sh: greedy stage training with the same data, samples and seed
must give a 5-stage codebook equal to the first 5 stages of a 10-stage one. LIB defaults to
build/libcommvq.so. Exit status 0 when equal, 1 when not (the first difference is printed)."""
import ctypes as C, sys

if len(sys.argv) < 3:
    sys.exit(__doc__)
lib = C.CDLL(sys.argv[3] if len(sys.argv) > 3 else "build/libcommvq.so")
CVQ_T_KEY_W = 1


def load(path):
    cb = C.c_void_p()
    st = lib.cvq_codebook_load(path.encode(), None, C.byref(cb))
    if st != 0:
        sys.exit(f"{path}: cannot load (status {st})")
    g = (C.c_uint32 * 16)()
    lib.cvq_codebook_geometry(cb, g)
    return cb, g


a, ga = load(sys.argv[1])
b, gb = load(sys.argv[2])
if tuple(ga[:5]) != tuple(gb[:5]):
    print(f"geometry differs: layers/hq/hkv/d/R {tuple(ga[:5])} vs {tuple(gb[:5])}")
    sys.exit(1)
n_layers, _, hkv, d, r = ga[:5]
n = hkv * r * 64 * (d // 2) * 2
for layer in range(n_layers):
    pa, pb = C.POINTER(C.c_float)(), C.POINTER(C.c_float)()
    assert lib.cvq_codebook_tensor_cdata(a, CVQ_T_KEY_W, layer, 0, C.byref(pa)) == 0
    assert lib.cvq_codebook_tensor_cdata(b, CVQ_T_KEY_W, layer, 0, C.byref(pb)) == 0
    if C.string_at(pa, 4 * n) != C.string_at(pb, 4 * n):
        print(f"layer {layer}: key_w differs")
        sys.exit(1)
print(f"key_w equal in all {n_layers} layers ({r} stages x {hkv} heads)")
