"""minehead.client: the importable client library for the three services.

    from minehead.client import EmbedderClient
    with EmbedderClient("127.0.0.1:50051") as c:
        vecs = c.embed_crops("photo.jpg", [[10, 20, 110, 220]])   # -> N x D float32 numpy

Every client takes an address (or reads MINEHEAD_<SERVICE>_ADDR), opens one channel, and
speaks numpy at its edge. Services that call each other use these same classes.
"""

from minehead.client.channel import connect, default_address
from minehead.client.embedder import EmbedderClient
from minehead.client.heads import HeadClient
from minehead.client.health import check_health
from minehead.client.jobs import JobsClient
from minehead.client.miner import MinerClient

__all__ = ["connect", "default_address", "EmbedderClient", "HeadClient", "MinerClient", "JobsClient", "check_health"]
