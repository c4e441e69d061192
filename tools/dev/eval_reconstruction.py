"""Held-out reconstruction error of a .cvq codebook on dumped KV (k_N.npy, v_N.npy of
`commvq-llama dump`), through the library's own encoder and decoder (ctypes, CPU backend).

usage: python3 tools/dev/eval_reconstruction.py build/libcommvq.so CODEBOOK.cvq DUMPDIR LAYER...

Prints per layer: key rel_error (sum||k-k^||^2/sum||k||^2), the per-element MSE of keys divided by
their token prescale (token key-scale mode), value rel_error and per-element MSE."""
import ctypes as C, sys, numpy as np
lib = C.CDLL(sys.argv[1]); cbp = sys.argv[2]; d = sys.argv[3]; layers = [int(x) for x in sys.argv[4:]]
class Params(C.Structure):
    _fields_ = [("backend", C.c_int), ("device", C.c_int), ("n_threads", C.c_int), ("cpu_reference", C.c_int), ("allocator", C.c_void_p)]
lib.cvq_context_default_params.restype = Params
p = lib.cvq_context_default_params(); p.backend = 1  # CPU
ctx = C.c_void_p(); cb = C.c_void_p()
assert lib.cvq_context_create(C.byref(p), C.byref(ctx)) == 0
assert lib.cvq_codebook_load(cbp.encode(), None, C.byref(cb)) == 0
g = (C.c_uint32 * 16)()
lib.cvq_codebook_geometry(cb, g)
R = g[4]; ks = g[5]
for l in layers:
    k = np.ascontiguousarray(np.load(f"{d}/k_{l}.npy").astype(np.float32)); v = np.ascontiguousarray(np.load(f"{d}/v_{l}.npy").astype(np.float32))
    T, H, D = k.shape
    codes = np.zeros((T, H, R), np.uint16); sc = np.zeros((T, H), np.float32)
    f = C.c_void_p
    assert lib.cvq_encode_keys(ctx, cb, l, k.ctypes.data_as(f), 0, C.c_size_t(T), codes.ctypes.data_as(f), sc.ctypes.data_as(f)) == 0
    kh = np.zeros_like(k)
    assert lib.cvq_decode_keys(ctx, cb, l, codes.ctypes.data_as(f), sc.ctypes.data_as(f), C.c_size_t(T), kh.ctypes.data_as(f)) == 0
    # value outputs: more than enough for any group count (encode writes [T][groups][Nc/8] flat)
    bits = np.zeros((T, 4096), np.uint8); sig = np.zeros((T, 64), np.float32)
    assert lib.cvq_encode_values(ctx, cb, l, v.ctypes.data_as(f), 0, C.c_size_t(T), bits.ctypes.data_as(f), sig.ctypes.data_as(f)) == 0
    # encode wrote [T][groups][Nc/8] contiguous at the start of the buffer: decode reads the same layout
    vh = np.zeros_like(v)
    assert lib.cvq_decode_values(ctx, cb, l, bits.ctypes.data_as(f), sig.ctypes.data_as(f), C.c_size_t(T), vh.ctypes.data_as(f)) == 0
    k64 = k.astype(np.float64); v64 = v.astype(np.float64)
    ke = ((k64 - kh) ** 2).sum(); ve = ((v64 - vh) ** 2).sum()
    s2 = (k64 ** 2).sum(axis=(1, 2))  # token prescale squared (token mode)
    kn = (((k64 - kh) ** 2).sum(axis=(1, 2)) / s2).mean() / (H * D)
    print(f"layer {l}: T={T} key rel_error {ke/(k64**2).sum():.4f} (normalised-key MSE per element {kn:.3g}); "
          f"value rel_error {ve/(v64**2).sum():.4f} (MSE per element {ve/v64.size:.3g})")
