import faiss
import numpy as np
import pytest
import torch

from ghindex.errors import ConfigError
from ghindex.hashing import (
    check_bits, greedy_sign, hamming_distances, pack_bits, pack_signs, quantization_penalty,
    unpack_bits, unpack_signs,
)


def test_forward_is_strictly_pm1_including_zeros():
    h = torch.tensor([[-2.0, -0.0, 0.0, 1e-9, -1e-9, 3.0, 0.0, -0.5]])
    b = greedy_sign(h)
    assert set(b.unique().tolist()) <= {-1.0, 1.0}
    assert b.tolist() == [[-1, 1, 1, 1, -1, 1, 1, -1]]


def test_backward_returns_upstream_gradient_exactly():
    h = torch.randn(5, 16, requires_grad=True)
    upstream = torch.randn(5, 16)
    greedy_sign(h).backward(upstream)
    assert torch.equal(h.grad, upstream)


def test_penalty_matches_hand_computation():
    h = torch.tensor([[0.5, -2.0], [0.0, 1.5]])
    # |0.5-1|^3, |-2+1|^3, |0-1|^3 (sign(0)=+1), |1.5-1|^3
    expected = (0.125 + 1.0 + 1.0 + 0.125) / 4
    assert quantization_penalty(h).item() == pytest.approx(expected)
    assert quantization_penalty(h, p=2).item() == pytest.approx((0.25 + 1 + 1 + 0.25) / 4)


def test_penalty_gradient_pulls_towards_pm1():
    h = torch.tensor([0.5, -2.0], requires_grad=True)
    quantization_penalty(h).backward()
    assert h.grad[0] < 0 and h.grad[1] < 0  # 0.5 moves up to 1, -2 moves up to -1


@pytest.mark.parametrize("nbits", [8, 16, 48, 64, 128])
def test_pack_unpack_round_trip(rng, nbits):
    bits = rng.integers(0, 2, size=(50, nbits), dtype=np.uint8)
    packed = pack_bits(bits)
    assert packed.shape == (50, nbits // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_bits(packed), bits)
    assert np.array_equal(pack_signs(unpack_signs(packed)), packed)


def test_bit_order_is_lsb_first_like_faiss():
    bits = np.zeros((1, 16), dtype=np.uint8)
    bits[0, 1] = 1  # bit 1 -> byte 0 value 2
    bits[0, 8] = 1  # bit 8 -> byte 1 value 1
    assert pack_bits(bits).tolist() == [[2, 1]]
    code = pack_bits(bits)[0]
    for i in range(16):
        assert (code[i >> 3] >> (i & 7)) & 1 == bits[0, i]


def test_pack_signs_maps_zero_to_one():
    assert pack_signs(np.array([[0.0, -1, 2, -0.0, 0, 0, 0, -3]])).tolist() == [[0b01111101]]


@pytest.mark.parametrize("nbits", [32, 48, 64])
def test_hamming_matches_inner_product_and_faiss(rng, nbits):
    q = rng.integers(0, 2, size=(20, nbits))
    d = rng.integers(0, 2, size=(300, nbits))
    qp, dp = pack_bits(q), pack_bits(d)
    ours = hamming_distances(qp, dp)
    pm_q, pm_d = unpack_signs(qp), unpack_signs(dp)
    assert np.array_equal(ours, ((nbits - pm_q @ pm_d.T) / 2).astype(np.int32))
    index = faiss.IndexBinaryFlat(nbits)
    index.add(dp)
    dist, ids = index.search(qp, 300)
    faiss_full = np.empty_like(ours)
    np.put_along_axis(faiss_full, ids.astype(np.int64), dist, axis=1)
    assert np.array_equal(ours, faiss_full)


@pytest.mark.parametrize("bad", [0, -8, 12, 7, 8.0, True, "64"])
def test_check_bits_rejects(bad):
    with pytest.raises(ConfigError, match="multiple of 8"):
        check_bits(bad)
