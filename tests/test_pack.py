"""exp_pack / exp_unpack: layout against the oracle, identity, storage size."""
import math

import pytest
import torch

import dnateq
from dnateq import reference as ref

from conftest import ALL_BITS, assert_codes_equal, gen, noncontig, random_codes, seed_of

SHAPES = [(), (1,), (7,), (33,), (1000,), (0,), (3, 0), (0, 5), (1, 1), (5, 1), (4, 7),
          (3, 33), (2, 1000), (6, 3, 3, 3), (8, 1, 1, 1), (4, 2, 5, 3)]


def rows_k(shape):
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_pack_matches_oracle_and_roundtrips(bits, signed):
    g = gen(seed_of("pack", bits, signed))
    b = bits + 1 if signed else bits
    for shape in SHAPES:
        codes = random_codes(shape, bits, g, signed=signed, zero_frac=0.2)
        packed = dnateq.exp_pack(codes, bits, signed)
        rows, K = rows_k(shape)
        row_bytes = 4 * math.ceil(K * b / 32)
        assert packed.dtype == torch.uint8
        assert list(packed.shape) == [rows, row_bytes], f"shape={shape}"
        # stored bits exceed the bit claim by at most 31 padding bits per row
        assert 0 <= packed.numel() * 8 - rows * K * b <= 31 * rows
        assert_codes_equal(packed, ref.exp_pack(codes, bits, signed), f"shape={shape}")
        back = dnateq.exp_unpack(packed, bits, signed, list(shape))
        assert back.dtype == torch.int8 and tuple(back.shape) == tuple(shape)
        assert_codes_equal(back, codes, f"roundtrip shape={shape}")
        assert_codes_equal(ref.exp_unpack(packed, bits, signed, list(shape)), codes,
                           f"oracle roundtrip shape={shape}")


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_unpack_random_bytes_matches_oracle(bits, signed):
    """Any field value is a valid code (signed: incl. sign bit + zero exponent)."""
    g = gen(seed_of("unpack", bits, signed))
    for shape in [(7,), (3, 33), (5, 2, 3, 3), (2, 1000)]:
        rows, K = rows_k(shape)
        packed = torch.randint(0, 256, (rows, ref.packed_row_bytes(K, bits, signed)),
                               generator=g, dtype=torch.int64).to(torch.uint8)
        got = dnateq.exp_unpack(packed, bits, signed, list(shape))
        assert_codes_equal(got, ref.exp_unpack(packed, bits, signed, list(shape)), str(shape))
        u = got.view(torch.uint8)
        assert bool(((u & 0x7F) >> bits == 0).all())
        if not signed:
            assert not bool((u & 0x80).any())


@pytest.mark.parametrize("bits", [2, 3, 5, 7])
def test_pack_noncontiguous(bits):
    g = gen(seed_of("pack-nc", bits))
    codes = random_codes((9, 33), bits, g)
    exp = ref.exp_pack(codes, bits, True)
    for kind in ["slice", "transpose"]:
        assert_codes_equal(dnateq.exp_pack(noncontig(codes, kind), bits, True), exp, kind)
    w = random_codes((4, 6, 3, 3), bits, g)
    wt = w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
    assert not wt.is_contiguous()
    assert_codes_equal(dnateq.exp_pack(wt, bits, True), ref.exp_pack(w, bits, True), "cl")


def test_pack_bit_layout_lsb_first_straddling():
    """3-bit unsigned fields straddle 32-bit words: element 10 uses bits 30..32."""
    bits, signed = 3, False
    codes = torch.zeros(11, dtype=torch.int8)
    codes[10] = 0b101
    packed = dnateq.exp_pack(codes, bits, signed)
    assert list(packed.shape) == [1, 8]
    word0 = int.from_bytes(bytes(packed[0, :4].tolist()), "little")
    word1 = int.from_bytes(bytes(packed[0, 4:].tolist()), "little")
    assert word0 == (0b01 << 30)
    assert word1 == 0b1
    # signed, n = 2: field = sign << 2 | biased
    c = torch.tensor([0b01, 0x80 | 0b11, 0b10], dtype=torch.uint8).view(torch.int8)
    p = dnateq.exp_pack(c, 2, True)
    assert p.tolist() == [[0b01 | (0b111 << 3) | ((0b010 & 0b11) << 6), 0b0, 0, 0]]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_padding_bits_are_zero(bits):
    g = gen(seed_of("pad", bits))
    for K in (1, 7, 33):
        codes = random_codes((3, K), bits, g, signed=True, zero_frac=0.0)
        p = dnateq.exp_pack(codes, bits, True).to(torch.int64)
        b = bits + 1
        nbits = K * b
        allbits = ((p.unsqueeze(-1) >> torch.arange(8)) & 1).reshape(3, -1)
        assert int(allbits[:, nbits:].sum()) == 0


def test_pack_signed_zero_code_survives_signed_pack():
    c = torch.tensor([0, -128, 1, -127], dtype=torch.int8)
    back = dnateq.exp_unpack(dnateq.exp_pack(c, 3, True), 3, True, [4])
    assert_codes_equal(back, c)


def test_pack_size_for_conv_weight():
    """A conv weight [O, I/g, kh, kw] packs as O rows of I/g*kh*kw."""
    codes = torch.ones(16, 3, 3, 3, dtype=torch.int8)
    p = dnateq.exp_pack(codes, 4, False)
    assert list(p.shape) == [16, 4 * math.ceil(27 * 4 / 32)]
    p = dnateq.exp_pack(codes, 4, True)
    assert list(p.shape) == [16, 4 * math.ceil(27 * 5 / 32)]
