"""Smoke test of every dnateq operator on one device, small shapes, each result
compared with the CPU operator. Meant to run under compute-sanitizer
(scripts/gpu_check.sh), so it is short and touches every CUDA code path:
quantize (check_finite on/off, every dtype), dequantize, pack/unpack (signed
and unsigned, every width), the count ops (direct, weight terms, counter
bits, conv with groups), the LUT ops (packed GEMV of csrc/lut/gemv.cu at every
field width and with split-K, the fallback GEMV, the float32 and bf16x3 GEMM
paths, conv), the non-finite errors, exp_error and exp_fit.

    python scripts/gpu_smoke.py [--device cuda|cpu] [--only quantize,pack,count,gemv2,lut,finite,fit]

Prints one line per check and exits 1 if any failed (0 when all passed).
--device cpu runs the same calls against the CPU itself (a dry run of the
script, where there is no GPU).
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of the checks (default: all)")
    args = ap.parse_args(argv)
    only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    import dnateq
    dev = torch.device(args.device)
    failures = []

    def check(name, fn, key):
        if only is not None and key not in only:
            return
        try:
            fn()
            print(f"ok    {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failures.append(name)
            print(f"FAIL  {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                  flush=True)
            traceback.print_exc()

    def close(got, want, rtol, what=""):
        got = got.float().cpu()
        want = want.float().cpu()
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30),
                                   msg=lambda m: f"{what}: {m}")

    g = torch.Generator().manual_seed(0)

    def fit(x, bits, alpha=None):
        return dnateq.exp_fit(x, bits, alpha=alpha)[:3]

    def quantize():
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = (torch.randn(1003, generator=g) * 3).to(dt)
            a, s, b = fit(x.float(), 4)
            for cf in (True, False):
                c = dnateq.exp_quantize(x.to(dev), a, s, b, 4, "nearest", cf)
                assert torch.equal(c.cpu(), dnateq.exp_quantize(x, a, s, b, 4)), dt
            for out in (torch.float32, torch.float16):
                d = dnateq.exp_dequantize(c, a, s, b, 4, out)
                assert torch.equal(d.cpu(), dnateq.exp_dequantize(c.cpu(), a, s, b, 4, out))
    check("exp_quantize / exp_dequantize", quantize, "quantize")

    def pack():
        for bits in range(2, 8):
            for signed in (True, False):
                x = torch.randn(5, 77, generator=g)
                x = x if signed else x.abs()
                c = dnateq.exp_quantize(x, *fit(x, bits), bits)
                p = dnateq.exp_pack(c.to(dev), bits, signed)
                assert torch.equal(p.cpu(), dnateq.exp_pack(c, bits, signed)), (bits, signed)
                assert torch.equal(dnateq.exp_unpack(p, bits, signed, [5, 77]).cpu(), c)
    check("exp_pack / exp_unpack (n = 2..7, signed, unsigned)", pack, "pack")

    def layer(M, K, N, bits, signed=True, relu=True):
        x = torch.randn(M, K, generator=g)
        x = torch.relu(x) if relu else x
        w = torch.randn(N, K, generator=g) / K ** 0.5
        w = w if signed else w.abs()
        a, sa, ba = fit(x, bits)
        _, sw, bw = fit(w, bits, alpha=a)
        return x, w, (a, sa, ba, sw, bw)

    def count():
        x, w, p = layer(5, 200, 9, 4)
        ac = dnateq.exp_quantize(x, p[0], p[1], p[2], 4)
        wc = dnateq.exp_quantize(w, p[0], p[3], p[4], 4)
        bias = torch.randn(9, generator=g)
        terms = dnateq.weight_terms(wc, 4)
        for t, cb in ((None, None), (terms, None), (None, 8)):
            want = dnateq.exp_linear_count(ac, wc, *p, 4, bias, cb, t)
            got = dnateq.exp_linear_count(ac.to(dev), wc.to(dev), *p, 4, bias.to(dev), cb,
                                          None if t is None else t.to(dev))
            close(got, want, 1e-6, f"linear count terms={t is not None} cb={cb}")
        xc = torch.relu(torch.randn(2, 4, 7, 6, generator=g))
        wcv = torch.randn(6, 2, 3, 3, generator=g) / 4
        ca = dnateq.exp_quantize(xc, p[0], p[1], p[2], 4)
        cw = dnateq.exp_quantize(wcv, p[0], p[3], p[4], 4)
        geo = dict(stride=2, padding=1, dilation=1, groups=2)
        close(dnateq.exp_conv2d_count(ca.to(dev), cw.to(dev), *p, 4, **geo),
              dnateq.exp_conv2d_count(ca, cw, *p, 4, **geo), 1e-6, "conv count")
    check("exp_linear_count / exp_conv2d_count", count, "count")

    def lut_linear(M, K, N, bits, signed, dtype, rtol, what):
        x, w, p = layer(M, K, N, bits, signed, relu=False)
        wp = dnateq.exp_pack(dnateq.exp_quantize(w, p[0], p[3], p[4], bits), bits, signed)
        bias = torch.randn(N, generator=g)
        x = x.to(dtype)
        want = dnateq.exp_linear_lut(x.float(), wp, [N, K], *p, bits, True, signed, "nearest",
                                     bias)
        got = dnateq.exp_linear_lut(x.to(dev), wp.to(dev), [N, K], *p, bits, True, signed,
                                    "nearest", bias.to(dev))
        assert got.dtype == dtype
        close(got, want, rtol, what)

    def gemv2():
        for bits in range(2, 8):
            for signed in (True, False):
                lut_linear(3, 256, 40, bits, signed, torch.float32, 1e-5,
                           f"gemv2 n={bits} signed={signed}")
        lut_linear(1, 128, 1, 3, True, torch.float16, 1e-3, "gemv2 fp16 1x128x1")
        lut_linear(8, 8192, 20, 3, True, torch.bfloat16, 8e-3, "gemv2 bf16 split-K")
        lut_linear(2, 4096, 300, 4, True, torch.float32, 1e-5, "gemv2 split-K fp32")
    check("exp_linear_lut packed GEMV (csrc/lut/gemv.cu)", gemv2, "gemv2")

    def lut_other():
        lut_linear(3, 1000, 33, 4, True, torch.float32, 1e-5, "fallback GEMV (K % 128 != 0)")
        lut_linear(40, 300, 33, 4, True, torch.float32, 1e-5, "GEMM float32")
        lut_linear(40, 300, 33, 4, True, torch.float16, 1e-3, "GEMM fp16 (bf16x3)")
        lut_linear(40, 300, 33, 5, False, torch.bfloat16, 8e-3, "GEMM bf16 (bf16x3)")
        x = torch.relu(torch.randn(2, 4, 9, 8, generator=g))
        w = torch.randn(6, 2, 3, 3, generator=g) / 4
        a, sa, ba = fit(x, 4)
        _, sw, bw = fit(w, 4, alpha=a)
        wp = dnateq.exp_pack(dnateq.exp_quantize(w, a, sw, bw, 4), 4, True)
        args = ([6, 2, 3, 3], a, sa, ba, sw, bw, 4, False, True, "nearest", None, 1, 1, 1, 2)
        close(dnateq.exp_conv2d_lut(x.to(dev), wp.to(dev), *args),
              dnateq.exp_conv2d_lut(x, wp, *args), 1e-5, "conv lut")
    check("exp_linear_lut GEMM paths / exp_conv2d_lut", lut_other, "lut")

    def non_finite():
        for M, K in ((1, 256), (3, 1000), (40, 256)):
            x, w, p = layer(M, K, 7, 4)
            wp = dnateq.exp_pack(dnateq.exp_quantize(w, p[0], p[3], p[4], 4), 4, True)
            x[-1, 3] = float("nan")
            try:
                dnateq.exp_linear_lut(x.to(dev), wp.to(dev), [7, K], *p, 4, False, True,
                                      "nearest", None)
            except RuntimeError as e:
                assert "non-finite" in str(e), str(e)
            else:
                raise AssertionError(f"no error for NaN at M={M} K={K}")
        x = torch.randn(10)
        x[2] = float("inf")
        try:
            dnateq.exp_quantize(x.to(dev), 2.0, 1.0, 0.0, 4)
        except RuntimeError as e:
            assert "non-finite" in str(e)
        else:
            raise AssertionError("no error for Inf in exp_quantize")
    check("non-finite inputs raise", non_finite, "finite")

    def fit_error():
        x = torch.randn(20000, generator=g) ** 3
        f_cpu = dnateq.exp_fit(x, 4)
        f_dev = dnateq.exp_fit(x.to(dev), 4)
        assert all(abs(u - v) <= 1e-12 * max(1.0, abs(u)) for u, v in zip(f_cpu, f_dev))
        e_cpu = dnateq.exp_error(x, *f_cpu[:3], 4)
        e_dev = dnateq.exp_error(x.to(dev), *f_cpu[:3], 4)
        assert abs(e_cpu - e_dev) <= 1e-9 * max(e_cpu, 1e-30), (e_cpu, e_dev)
    check("exp_fit / exp_error", fit_error, "fit")

    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"{'all passed' if not failures else 'FAILED: ' + ', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
