#!/usr/bin/env python3
"""Dev-only (not part of the build): fits the polynomial pieces of cvq_erf_f32
and checks the sin/cos polynomials of cvq_sincos_turn (core/numerics.c).

It prints the binary32 coefficients as C literals and the maximum absolute
error measured when the polynomials are evaluated in numpy float32, one
rounding per operation and no FMA, exactly as the C code evaluates them.
The coefficients committed in core/numerics.c and docs/numerics.md are the
ones this script prints.  Needs numpy and mpmath; takes about a minute.

    python3 tools/dev/gen_erf_coeffs.py            # fit, print, sweep
    python3 tools/dev/gen_erf_coeffs.py --quick    # coarser sweep

erf pieces (a = |x|, erf(-x) = -erf(x)):
  piece 0, 0 <= a < 1:  t = a*a;  erf = a + a*P(t)      (P(0) = 2/sqrt(pi)-1)
  piece k, lo <= a < hi: u = a - c (exact: Sterbenz, lo/2 <= c <= 2*lo);
                        erf = 1 - Q_k(u)                (Q_k ~ erfc(c + u))
  a >= 4 (and +Inf):     erf = 1                        (erfc(4) = 1.5e-8)
Every polynomial is evaluated in Horner form from the highest coefficient:
  q = C[n]; q = q*u + C[n-1]; ...; q = q*u + C[0].

The sin/cos polynomials are plain Taylor coefficients rounded to binary32
(accurate enough on [0, pi/4]: truncation < 2e-9); the script only checks
them (all 2^24+1 reduced arguments).

It also prints the 1280 bits of 1/(2*pi) used by cvq_rope_phase_step (40
words of 32 bits, most significant first) and a few exact phase steps
t = round(frac(theta/(2*pi)) * 2^64) mod 2^64 that tests/test_numerics.c
uses as known answers.
"""
import math
import sys

import mpmath as mp
import numpy as np

mp.mp.dps = 50
F32 = np.float32

# (lo, hi, centre) of the pieces of erfc for 1 <= a < 4.
PIECES = [(1.0, 2.0, 1.5), (2.0, 3.0, 2.5), (3.0, 4.0, 3.5)]
CUTOFF = 4.0
FIT_TARGET = 2e-9  # approximation error allowed before binary32 rounding


def fit(func, interval):
    """Smallest-degree near-minimax (Chebyshev) fit with error <= FIT_TARGET.
    Returns (coefficients low -> high as binary32, approximation error)."""
    for n in range(3, 16):
        poly, err = mp.chebyfit(func, interval, n, error=True)
        if err <= FIT_TARGET:
            coeffs = [F32(float(c)) for c in reversed(poly)]
            return coeffs, float(err)
    raise RuntimeError("no fit")


def horner(coeffs, u):
    q = np.full_like(u, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        q = q * u + c  # float32 multiply, round, float32 add, round
    return q


def erf_f32(x, p0, qs):
    """Mirror of cvq_erf_f32 in float32 numpy (x: float32 array)."""
    x = np.asarray(x, dtype=F32)
    a = np.abs(x)
    r = np.ones_like(a)  # a >= CUTOFF
    m = a < F32(1.0)
    am = a[m]
    t = am * am
    r[m] = am + am * horner(p0, t)
    for (lo, hi, c), q in zip(PIECES, qs):
        m = (a >= F32(lo)) & (a < F32(hi))
        u = a[m] - F32(c)
        r[m] = F32(1.0) - horner(q, u)
    r = np.where(x < 0, -r, r)
    return np.where(np.isnan(x), x, r).astype(F32)


def c_literal(v):
    s = np.format_float_scientific(F32(v), unique=True, exp_digits=2)
    s = s.replace("e+00", "").replace(".e", ".0e")
    if s.endswith("."):
        s += "0"
    return s + "f"


def sweep_erf(p0, qs, quick):
    """Every binary32 in [2^-26, 4.25] (quick: every 7th), plus a coarse
    pass over tiny and large values; reference: double erf (libm)."""
    ref = np.frompyfunc(math.erf, 1, 1)
    lo_bits = int(F32(2.0**-26).view(np.uint32))
    hi_bits = int(F32(4.25).view(np.uint32))
    step = 7 if quick else 1
    worst, worst_x = 0.0, 0.0
    chunk = 1 << 22
    for b0 in range(lo_bits, hi_bits, chunk * step):
        bits = np.arange(b0, min(b0 + chunk * step, hi_bits), step,
                         dtype=np.uint32)
        x = bits.view(F32)
        y = erf_f32(x, p0, qs).astype(np.float64)
        e = np.abs(y - ref(x.astype(np.float64)).astype(np.float64))
        i = int(np.argmax(e))
        if e[i] > worst:
            worst, worst_x = float(e[i]), float(x[i])
    extra = np.concatenate([np.geomspace(1e-45, 2.0**-26, 20000),
                            np.linspace(4.25, 12.0, 20000)]).astype(F32)
    e = np.abs(erf_f32(extra, p0, qs).astype(np.float64)
               - ref(extra.astype(np.float64)).astype(np.float64))
    i = int(np.argmax(e))
    if e[i] > worst:
        worst, worst_x = float(e[i]), float(extra[i])
    return worst, worst_x


# ---- sin / cos ---------------------------------------------------------
SIN_C = [F32(-1.0 / 6.0), F32(1.0 / 120.0), F32(-1.0 / 5040.0),
         F32(1.0 / 362880.0)]
COS_C = [F32(-0.5), F32(1.0 / 24.0), F32(-1.0 / 720.0), F32(1.0 / 40320.0),
         F32(-1.0 / 3628800.0)]
K = F32(np.float32(math.pi) * F32(2.0**-26))  # exact: power-of-two scale


def sincos_poly(a):
    """Mirror of the C: a2 = a*a; sa = a + (a*a2)*S(a2); ca = 1 + a2*C(a2)."""
    a2 = a * a
    sa = a + (a * a2) * horner(SIN_C, a2)
    ca = F32(1.0) + a2 * horner(COS_C, a2)
    return sa, ca


def sweep_sincos():
    m = np.arange(0, (1 << 24) + 1, dtype=np.int64)
    a = m.astype(F32) * K  # exact conversion (m <= 2^24), one rounding
    sa, ca = sincos_poly(a)
    a64 = a.astype(np.float64)
    poly_err = max(np.max(np.abs(sa - np.sin(a64))),
                   np.max(np.abs(ca - np.cos(a64))))
    # Against the exact angle m * pi / 2^26 (includes fl32(pi) and the
    # rounding of m*K): what cvq_sincos_turn adds to the 2^-32-turn grid.
    ang = m.astype(np.float64) * (math.pi / 2.0**26)
    full_err = max(np.max(np.abs(sa - np.sin(ang))),
                   np.max(np.abs(ca - np.cos(ang))))
    return float(poly_err), float(full_err)


def inv_2pi_words(n=40):
    with mp.workdps(500):
        x = 1 / (2 * mp.pi)
        words = []
        for _ in range(n):
            x *= 2**32
            w = int(mp.floor(x))
            words.append(w)
            x -= w
    return words


def phase_step(theta):
    with mp.workdps(500):
        v = mp.mpf(theta) / (2 * mp.pi)
        return int(mp.nint((v - mp.floor(v)) * 2**64)) % 2**64


def main():
    quick = "--quick" in sys.argv
    p0, e0 = fit(lambda t: mp.erf(mp.sqrt(t)) / mp.sqrt(t) - 1,
                 [mp.mpf("1e-40"), 1])
    qs, errs = [], []
    for lo, hi, c in PIECES:
        cc = mp.mpf(c)
        q, e = fit(lambda u, cc=cc: mp.erfc(cc + u), [lo - cc, hi - cc])
        qs.append(q)
        errs.append(e)
    print("/* erf piece 0 (|x| < 1), t = x*x: erf = x + x*P(t); "
          "approx err %.2e */" % e0)
    print("static const float ERF_P[%d] = {" % len(p0))
    for i, c in enumerate(p0):
        print("    %s, /* t^%d */" % (c_literal(c), i))
    print("};")
    for k, ((lo, hi, c), q, e) in enumerate(zip(PIECES, qs, errs), 1):
        print("/* erf piece %d (%g <= |x| < %g), u = |x| - %g: "
              "erf = 1 - Q(u); approx err %.2e */" % (k, lo, hi, c, e))
        print("static const float ERF_Q%d[%d] = {" % (k, len(q)))
        for i, cf in enumerate(q):
            print("    %s, /* u^%d */" % (c_literal(cf), i))
        print("};")
    worst, wx = sweep_erf(p0, qs, quick)
    print("erf: max abs error evaluated in float32 = %.3e at x = %.9g%s"
          % (worst, wx, " (quick sweep)" if quick else ""))
    print("sin coefficients (a^3, a^5, a^7, a^9):",
          ", ".join(c_literal(c) for c in SIN_C))
    print("cos coefficients (a^2 .. a^10):",
          ", ".join(c_literal(c) for c in COS_C))
    print("K = fl32(pi) * 2^-26 =", c_literal(K), "=", float(K).hex())
    words = inv_2pi_words()
    print("static const uint32_t INV_2PI[40] = {")
    for i in range(0, 40, 5):
        print("    " + " ".join("0x%08XU," % w for w in words[i:i + 5]))
    print("};")
    for th in [1.0, 0.5, 2.0**-20, 2.4e-6, 1000.0, 3.0e10, 1e300,
               2 * math.pi, 5e-324]:
        print("phase step t(%r) = 0x%016XU" % (th, phase_step(th)))
    pe, fe = sweep_sincos()
    print("sin/cos: max abs error vs double sin/cos of the float argument"
          " = %.3e; vs the exact angle m*pi/2^26 = %.3e" % (pe, fe))


if __name__ == "__main__":
    main()
