"""The HVG statistics passes on a Ray cluster. The driver, which read obs, sends each task a run
of row blocks: their row ids (SOMA joinids) and their cells' stratum codes, nothing else. A task
opens only the count matrix (``shards.open_reader``: X and var, never obs), sums its blocks and
returns one array of strata x genes; the driver adds those up. A pass thus moves
O(cells / tasks) into each task and O(strata x genes) out of it, whatever the corpus size. The
selection is the serial passes' (float64 sums; only their order differs)."""

from __future__ import annotations

import numpy as np

from censusvi.data.hvg import BlockFn, Reducer, running_sum
from censusvi.data.ray_stream import READ_TASK_ENV  # two malloc arenas: TileDB reads, as there
from censusvi.data.shards import PlannedSource, open_reader, read_ids

TASKS_PER_CPU = 2  # tasks per cluster CPU in a pass, at least: a few per CPU balance the load
BLOCKS_PER_TASK = 16  # at most: a task's row ids and codes (and memory) stay independent of N
# A worker process runs at most this many HVG tasks, then exits: each task reads its arguments
# zero-copy from a new place of the object store, and those shared pages stay mapped (in RSS)
# for the life of the process, so a long-lived process would grow with the number of tasks a
# pass has (with N): 0.29 -> 0.45 GiB from 2 M to 20 M cells, flat at 0.28 with this bound
# (bench/census_scale.py; a process start per 4 tasks: planning 67.8 -> 77.3 s at 20 M).
CALLS_PER_PROCESS = 4


def _hvg_task(
    spec: PlannedSource, fn: BlockFn, bounds: np.ndarray, ids: np.ndarray, code: np.ndarray
) -> np.ndarray:
    """Ray task: ``fn`` summed over consecutive blocks; block ``i`` is rows
    ``bounds[i]:bounds[i + 1]`` of ``ids`` and ``code`` (this task's share only)."""
    from censusvi.data.counts import check_counts

    reader = open_reader(spec.uri, spec.obs_filter, spec.layer, spec.soma)

    def part(i: int) -> np.ndarray:
        a, b = int(bounds[i]), int(bounds[i + 1])
        x = read_ids(reader, spec.soma, ids[a:b])
        check_counts(x, f"{spec.uri} (cells {ids[a]}..{ids[b - 1]})")
        return fn(x, code[a:b])

    return running_sum(part(i) for i in range(len(bounds) - 1))


def ray_reducer(source: PlannedSource, tasks: int | None = None) -> Reducer:
    """A reducer whose passes run as Ray tasks over ``source``'s rows (``shards.planned_source``
    of the driver's source): ``tasks`` per pass (default ``TASKS_PER_CPU`` per cluster CPU, more
    for a large corpus: at most ``BLOCKS_PER_TASK`` blocks each)."""
    spec = PlannedSource(
        source.uri, source.obs_filter, source.layer, source.soma, np.zeros(0, np.int64), [], []
    )

    def reduce(fn: BlockFn, blocks: list[tuple[int, int]], code: np.ndarray) -> np.ndarray:
        import ray

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        wanted = tasks or max(cpus * TASKS_PER_CPU, -(-len(blocks) // BLOCKS_PER_TASK))
        n_tasks = min(wanted, len(blocks))
        remote = ray.remote(max_calls=CALLS_PER_PROCESS)(_hvg_task).options(
            name="hvg_task", max_retries=2, runtime_env=READ_TASK_ENV
        )
        spec_ref, fn_ref = ray.put(spec), ray.put(fn)

        def submitted():
            for run in np.array_split(np.arange(len(blocks)), n_tasks):
                a, b = blocks[run[0]][0], blocks[run[-1]][1]
                bounds = np.array([blocks[i][0] for i in run] + [b]) - a
                yield remote.remote(spec_ref, fn_ref, bounds, source.ids[a:b], code[a:b])

        return running_sum(ray.get(ref) for ref in _window(submitted(), 2 * cpus))

    return reduce


def _window(refs, size: int):
    """``refs`` in order, at most ``size`` submitted ahead of the one awaited: the tasks' row ids
    sit in the object store a window at a time, not the whole corpus's at once."""
    from collections import deque

    ahead: deque = deque()
    for ref in refs:
        ahead.append(ref)
        if len(ahead) >= size:
            yield ahead.popleft()
    yield from ahead
