"""Wire protocol shared by the PLM owner's server and the data owner's client."""

from shared.protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
