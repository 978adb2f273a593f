"""The HVG statistics passes on a Ray cluster: each block of rows is a Ray Data task that opens
the source itself and returns its partial sums; the driver adds them up. The result is the same
selection as the serial passes (sums are exact in float64, whatever the order)."""

from __future__ import annotations

import numpy as np

from censusvi.data.hvg import BlockFn, Reducer

_OPEN: dict[tuple, object] = {}  # one open source per worker process


def _source(uri: str, obs_filter: str | None, layer: str | None):
    from censusvi.data.soma import open_source

    key = (uri, obs_filter, layer)
    if key not in _OPEN:
        _OPEN[key] = open_source(uri, obs_filter=obs_filter, layer=layer)
    return _OPEN[key]


def ray_reducer(uri: str, obs_filter: str | None = None, layer: str | None = None) -> Reducer:
    def reduce(fn: BlockFn, blocks: list[tuple[int, int]]) -> np.ndarray:
        import ray

        def partial(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            src = _source(uri, obs_filter, layer)
            sums = [fn(src, int(a), int(b)) for a, b in zip(batch["start"], batch["stop"])]
            return {"sums": np.stack(sums)}

        items = [{"start": a, "stop": b} for a, b in blocks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        total = None
        for batch in ds.map_batches(partial, batch_size=1).iter_batches(batch_size=None):
            part = np.asarray(batch["sums"]).sum(0)
            total = part if total is None else total + part
        return total

    return reduce
