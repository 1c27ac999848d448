"""moe2: collaborative inference over heterogeneous edge LLMs on a NATS bus."""

from moe2.runtime.client import Client, connect
from moe2.runtime.errors import ErrorCode, Moe2Error

__all__ = ["Client", "ErrorCode", "Moe2Error", "connect"]
__version__ = "0.1.0"
