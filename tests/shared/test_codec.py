"""The tensor codec: exact round trips for every wire dtype and shape, and the byte layout."""

from __future__ import annotations

import struct

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.codec import TORCH_DTYPES, decode_tensor, encode_tensor, pack, unpack, unpack_raw
from shared.protocol import RepresentRequest, WireTensor

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


@st.composite
def tensors(draw, dtype: str) -> torch.Tensor:
    """Any tensor of ``dtype``, including NaN/inf and empty or 0-d shapes."""
    if dtype == "int32":
        array = draw(hnp.arrays(np.int32, shapes))
        return torch.from_numpy(array)
    floats = hnp.arrays(np.float32, shapes, elements=st.floats(width=32))
    return torch.from_numpy(draw(floats)).to(TORCH_DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@given(data=st.data())
def test_round_trip_is_exact(dtype, data):
    tensor = data.draw(tensors(dtype))
    wire = encode_tensor(tensor)
    assert wire.dtype == dtype and wire.shape == list(tensor.shape)
    back = decode_tensor(WireTensor.model_validate(unpack_raw(pack(wire))))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    # Compare bits (same-width integer views), so NaN payloads and -0.0 count too.
    bits = torch.int16 if tensor.element_size() == 2 else torch.int32
    assert torch.equal(back.view(bits), tensor.view(bits))


def test_bytes_are_little_endian_row_major_and_bf16_is_the_upper_half_of_f32():
    t = torch.tensor([[1.5, -2.0], [0.25, 3.0]])
    assert encode_tensor(t).data == struct.pack("<4f", 1.5, -2.0, 0.25, 3.0)
    bf16 = encode_tensor(t.to(torch.bfloat16)).data
    upper = [struct.pack("<f", v)[2:] for v in (1.5, -2.0, 0.25, 3.0)]
    assert bf16 == b"".join(upper)
    assert encode_tensor(torch.tensor([1, -2], dtype=torch.int32)).data == struct.pack("<2i", 1, -2)


def test_non_contiguous_and_gpu_style_views_encode_their_values():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(decode_tensor(encode_tensor(t)), t)


def test_decoded_tensor_is_writable():
    back = decode_tensor(encode_tensor(torch.ones(3)))
    back += 1
    assert back.tolist() == [2.0, 2.0, 2.0]


def test_unsupported_dtype_is_refused_with_the_supported_list():
    with pytest.raises(ValueError, match="float32"):
        encode_tensor(torch.ones(2, dtype=torch.float64))


def test_data_size_must_match_shape():
    with pytest.raises(ValidationError, match="needs 24"):
        WireTensor(dtype="float32", shape=[2, 3], data=b"\0" * 20)


def test_malformed_msgpack_is_a_value_error():
    with pytest.raises(ValueError, match="msgpack"):
        unpack_raw(b"\xc1")


def test_protocol_models_round_trip_through_msgpack():
    request = RepresentRequest(sequences=[[1, 2, 3], [4]], start=[2, 0], dtype="bfloat16", logits=3)
    assert unpack(pack(request), RepresentRequest) == request
