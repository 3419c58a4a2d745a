"""Where the miner's per-image work runs: the ImagePool seam (`pool.py`), chosen once when the
miner starts, with two implementations.

    pool.py        ImagePool (detect, draft, close); LocalPool: in the miner's process
    ray_pool.py    RayPool: on Ray actors (--ray-address); imports Ray on first use only
    ray_worker.py  Worker: the Ray actor
    specs.py       what travels between them: per-job setups and per-chunk results
"""
