"""The data owner's client (`pema-client`): talks to a `pema-server` over the shared protocol."""

from data_owner_client.client import PemaClient, ServerError

__all__ = ["PemaClient", "ServerError"]
