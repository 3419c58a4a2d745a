"""minehead clients: the importable client library and the `minehead` command.

    from clients import EmbedderClient
    with EmbedderClient("127.0.0.1:50051") as c:
        vecs = c.embed_crops("photo.jpg", [[10, 20, 110, 220]])   # -> N x D float32 numpy
"""

from clients.channel import connect, default_address
from clients.embedder import EmbedderClient
from clients.health import check_health
from clients.jobs import JobsClient

__all__ = ["connect", "default_address", "EmbedderClient", "JobsClient", "check_health"]
