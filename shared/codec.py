"""Tensors and bodies on the wire: torch ⇄ :class:`WireTensor`, pydantic models ⇄ msgpack."""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
import numpy as np
import torch
from pydantic import BaseModel

from shared.protocol import ITEMSIZE, WireTensor

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
}
_WIRE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
# Same-width integer views carry the raw bits, so numpy can fix the byte order (it has no bf16).
_BITS: dict[int, tuple[torch.dtype, np.dtype[Any]]] = {
    2: (torch.int16, np.dtype("<i2")),
    4: (torch.int32, np.dtype("<i4")),
}

M = TypeVar("M", bound=BaseModel)


def encode_tensor(tensor: torch.Tensor) -> WireTensor:
    """Serialise a float32/float16/bfloat16/int32 tensor of any shape."""
    name = _WIRE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(
            f"dtype {tensor.dtype} cannot go on the wire; use one of {list(TORCH_DTYPES)}"
        )
    t = tensor.detach().to("cpu").contiguous()
    view, little = _BITS[ITEMSIZE[name]]
    bits = t.view(view).numpy().astype(little, copy=False)
    return WireTensor(dtype=name, shape=list(t.shape), data=bits.tobytes())


def decode_tensor(wire: WireTensor) -> torch.Tensor:
    """Rebuild the tensor (a fresh, writable CPU tensor)."""
    view, little = _BITS[ITEMSIZE[wire.dtype]]
    bits = np.frombuffer(wire.data, dtype=little).astype(little.newbyteorder("="))
    return torch.from_numpy(bits).view(TORCH_DTYPES[wire.dtype]).reshape(wire.shape)


def pack(model: BaseModel) -> bytes:
    """A protocol model as a msgpack body."""
    return msgpack.packb(model.model_dump(exclude_none=True), use_bin_type=True)


def unpack_raw(body: bytes) -> Any:
    """A msgpack body as plain Python objects; raises ValueError when malformed."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ValueError(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from exc


def unpack(body: bytes, model: type[M]) -> M:
    """A msgpack body validated as a protocol model."""
    return model.model_validate(unpack_raw(body))


def hash_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Feed named tensors to a hashlib ``digest``, in name order: each name, dtype and shape,
    then its bytes (the server's model fingerprint and the client's adapter identity)."""
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy())
