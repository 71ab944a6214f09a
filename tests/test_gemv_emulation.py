"""CPU emulation of the CUDA packed GEMV (csrc/lut/gemv.cu, gemv2_kernel): its
unit / vector / field index math against exp_pack's format for every field
width (n = 2..7, signed and unsigned), its shared-memory swizzle (a
bijection, and conflict-free for the 8 lanes of a quarter warp), its split-K
plan, and its arithmetic (per-lane float32 FMAs, warp shuffle tree) against
exp_linear_lut. The constants and formulas below mirror gemv.cu; a change
there must be made here too. Runs without a GPU."""
import math

import numpy as np
import pytest
import torch

import dnateq

K_ALIGN = 128          # kG2KAlign
SMEM_BYTES = 64 * 1024  # kG2SmemBytes
WARPS = 16             # kG2Warps


def geo(fb):
    """Geo<FB>: chunks U, 16-byte vectors V, elements E per unit, rows R per warp."""
    U = 4 // math.gcd(fb, 4)
    V = U * fb // 4
    R = 4 if V == 1 else (2 if V <= 3 else 1)
    return U, V, 32 * U, R


def x_phys(k, U):
    """x_phys<U>(k): shared-memory position of slice element k."""
    c, t = k >> 5, k & 31
    return (c << 5) | ((((t >> 2) ^ ((c // U) & 7)) << 2) | (t & 3))


def plan(M, N, K, fb, sms, blocks_per_sm):
    """launch_fb_m: (S, KS, gx, smem bytes)."""
    U, V, E, R = geo(fb)
    ngroups = -(-N // (WARPS * R))
    ks_max = max(K_ALIGN, SMEM_BYTES // (4 * M) // K_ALIGN * K_ALIGN)
    S = -(-K // ks_max)
    if 2 * ngroups * S <= sms:
        want = -(-sms // ngroups)
        S = max(S, min(want, max(1, K // 512)))
    KS = -(-K // S)
    KS = -(-KS // K_ALIGN) * K_ALIGN
    S = -(-K // KS)
    resident = blocks_per_sm * sms
    gx = max(1, min(ngroups, -(-resident // S)))
    return S, KS, gx, M * KS * 4


def unit_fields(row_bytes_u8, fb, k0, u):
    """The FB-bit fields of unit u of the slice starting at element k0, read
    the way gemv2_kernel reads them: V 16-byte vectors from vector
    k0 / 128 * FB + u * V, words wd[0 .. 4V), constant shifts with straddle."""
    U, V, E, R = geo(fb)
    vec = np.frombuffer(row_bytes_u8.tobytes(), dtype="<u4").reshape(-1, 4)
    v0 = k0 // K_ALIGN * fb + u * V
    wd = vec[v0:v0 + V].reshape(-1).astype(np.uint64)
    assert wd.size == 4 * V == U * fb
    mask = (1 << fb) - 1
    out = []
    for cc in range(U):
        for g in range(8):
            for j in range(4):
                bit = cc * 32 * fb + (4 * g + j) * fb
                wi, sh = bit >> 5, bit & 31
                f = int(wd[wi]) >> sh
                if sh + fb > 32:
                    f |= (int(wd[wi + 1]) << (32 - sh)) & 0xFFFFFFFF
                out.append(f & mask)
    return out


def code_to_field(codes, bits, signed):
    c = codes.to(torch.int64) & 0xFF
    mag = c & 0x7F
    if not signed:
        return mag
    return torch.where((c & 0x80) != 0, 1 << bits, 0) | mag


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
def test_unit_fields_match_exp_pack(bits, signed):
    fb = bits + 1 if signed else bits
    U, V, E, R = geo(fb)
    assert E % 32 == 0 and K_ALIGN % E == 0 and (U * fb) % 4 == 0
    # every row of K % 128 == 0 elements is a whole number of units and vectors
    g = torch.Generator().manual_seed(bits * 2 + signed)
    N, K = 3, 640
    x = torch.randn(N, K, generator=g)
    if not signed:
        x = x.abs()
    x[:, ::5] = 0
    codes = dnateq.exp_quantize(x, 1.6, 0.2, 0.0, bits)
    wp = dnateq.exp_pack(codes, bits, signed)
    assert wp.shape[1] % 16 == 0 and wp.shape[1] // 16 == K // K_ALIGN * fb
    want = code_to_field(codes, bits, signed)
    for n in range(N):
        row = wp[n].numpy()
        for k0, ks in ((0, K), (128, 256), (384, 256)):   # whole row and split-K slices
            got = []
            for u in range(ks // E):
                got += unit_fields(row, fb, k0, u)
            assert got == want[n, k0:k0 + ks].tolist(), (n, k0)


@pytest.mark.parametrize("fb", range(2, 9))
def test_x_swizzle_bijective_and_conflict_free(fb):
    U, V, E, R = geo(fb)
    ks = 1024
    phys = [x_phys(k, U) for k in range(ks)]
    assert sorted(phys) == list(range(ks))
    for k in range(ks):  # a chunk stays in its 32 floats; 4-float groups stay whole
        assert phys[k] >> 5 == k >> 5 and phys[k] & 3 == k & 3
    # The read of lane l (unit u = base + l), chunk cc, group g: float4 at
    # (c << 5) + ((g ^ (u & 7)) << 2). A quarter warp (8 lanes) must hit 8
    # distinct 16-byte bank groups: (address / 4) mod 8 distinct.
    for base in (0, 32, 8):
        for cc in range(U):
            for g in range(8):
                slots = set()
                for l in range(8):
                    u = base + l
                    c = u * U + cc
                    addr = (c << 5) + ((g ^ (u & 7)) << 2)
                    # it is where the prologue put elements 32c + 4g .. + 3
                    assert addr == x_phys(32 * c + 4 * g, U)
                    slots.add((addr >> 2) & 7)
                assert len(slots) == 8, (fb, base, cc, g)


@pytest.mark.parametrize("M", [1, 2, 3, 8])
@pytest.mark.parametrize("N,K", [(8192, 8192), (4096, 4096), (70, 1024), (1, 128),
                                 (100_000, 256), (256, 65536), (11, 131072)])
@pytest.mark.parametrize("fb", [3, 4, 5, 8])
def test_split_plan(M, N, K, fb):
    sms = 132
    S, KS, gx, smem = plan(M, N, K, fb, sms, blocks_per_sm=1)
    assert KS % K_ALIGN == 0 and KS >= K_ALIGN
    assert (S - 1) * KS < K <= S * KS           # slices cover K, none empty
    assert smem <= SMEM_BYTES
    assert 1 <= gx <= -(-N // (WARPS * geo(fb)[3]))
    if S > 1 and M * K * 4 <= SMEM_BYTES:
        assert KS >= 512                        # split only for parallelism, not below 512
    if (M, N, K, fb) == (1, 8192, 8192, 4):
        assert S == 1                           # the target shape: one launch, no partials


def _kernel_emulation(x, wp, N, K, fb, lut, M):
    """gemv2_kernel's arithmetic in float32: lane l accumulates units l, l+32, ...
    in the kernel's order; a butterfly of xor-shuffles sums the 32 lanes."""
    U, V, E, R = geo(fb)
    S, KS, _, _ = plan(M, N, K, fb, 132, 1)
    out = np.zeros((S, M, N), dtype=np.float32)
    for s in range(S):
        k0 = s * KS
        ks = min(KS, K - k0)
        nu = ks // E
        for n in range(N):
            acc = np.zeros((32, M), dtype=np.float32)
            row = wp[n].numpy()
            for lane in range(32):
                for u in range(lane, nu, 32):
                    f = unit_fields(row, fb, k0, u)
                    w = lut[f].astype(np.float32)
                    for m in range(M):
                        xs = x[m, k0 + u * E:k0 + (u + 1) * E]
                        a = acc[lane, m]
                        for i in range(E):   # fmaf chain, in element order
                            a = np.float32(a + np.float32(w[i] * xs[i]))
                        acc[lane, m] = a
            for off in (16, 8, 4, 2, 1):
                acc = (acc + acc[np.arange(32) ^ off]).astype(np.float32)
            out[s, :, n] = acc[0]
    return out.sum(0, dtype=np.float32) if S > 1 else out[0]


@pytest.mark.parametrize("bits,signed", [(3, True), (4, True), (2, False), (6, True)])
def test_kernel_arithmetic_matches_exp_linear_lut(bits, signed):
    g = torch.Generator().manual_seed(bits)
    M, N, K = 2, 5, 256
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / 16
    if not signed:
        w = w.abs()
    a, sa, ba, _ = dnateq.exp_fit(x, bits)
    _, sw, bw, _ = dnateq.exp_fit(w, bits, alpha=a)
    wc = dnateq.exp_quantize(w, a, sw, bw, bits)
    wp = dnateq.exp_pack(wc, bits, signed)
    fb = bits + 1 if signed else bits
    # field -> signed level table (format.h field_values)
    levels = dnateq.exp_dequantize(torch.arange(0, 1 << bits, dtype=torch.int8), a, sw, bw,
                                   bits).numpy()
    lut = np.zeros(1 << fb, dtype=np.float32)
    for f in range(1 << fb):
        mag = f & ((1 << bits) - 1)
        neg = signed and (f >> bits) & 1
        lut[f] = -levels[mag] if neg else levels[mag]
    xq = dnateq.exp_dequantize(dnateq.exp_quantize(x, a, sa, ba, bits), a, sa, ba, bits).numpy()
    got = _kernel_emulation(xq, wp, N, K, fb, lut, M)
    want = dnateq.exp_linear_lut(x, wp, [N, K], a, sa, ba, sw, bw, bits, True, signed,
                                 "nearest", None)
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-5, atol=2e-5 * float(want.abs().max()))
