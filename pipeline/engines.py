"""Where the pipeline's heavy work runs: on this machine (``local``) or across a Ray cluster (``ray``).

A stage hands an engine a list of picklable tasks and a *worker factory*: a picklable callable that, called once in
each worker, builds what the work needs (the image store, an MLLM backend, a box scorer) and returns a function from
a batch of tasks to a batch of results. The local engine calls it once and feeds it batches in order. The Ray engine
runs the same factory in a fixed pool of Ray actors over a Ray Dataset (``map_batches`` with
``compute=ActorPoolStrategy(size=workers)``, Ray's API since 2.51 replaced the ``concurrency`` argument), so a cluster
with vLLM replicas or GPUs does the same work; results come back to the driver, which alone writes to the database.
Both keep the input order, so both engines produce the same rows.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
BatchFn = Callable[[list[Any]], list[Any]]
WorkerFactory = Callable[[], BatchFn]


class Engine(Protocol):
    name: str

    def map_batches(
        self, factory: WorkerFactory, tasks: Sequence[Any], *, batch_size: int, desc: str
    ) -> Iterator[list[Any]]:
        """Results of ``factory()(batch)`` for consecutive batches of ``tasks``, in order."""
        ...


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class LocalEngine:
    """Runs the work in this process (backends and scorers use their own threads and batching).

    The work runs in a background thread one batch ahead of the caller, so the caller's database writes for one
    batch overlap the next batch's work (an MLLM server never waits for them).
    """

    name = "local"

    def __init__(self, *, progress: bool = True, read_ahead: int = 1) -> None:
        self.progress = progress
        self.read_ahead = read_ahead

    def map_batches(
        self, factory: WorkerFactory, tasks: Sequence[Any], *, batch_size: int, desc: str
    ) -> Iterator[list[Any]]:
        if not tasks:
            return
        work = factory()
        done = object()
        results: queue.Queue[Any] = queue.Queue(maxsize=self.read_ahead)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in _chunks(tasks, batch_size):
                    if stop.is_set():
                        return
                    out = work(batch)
                    if len(out) != len(batch):
                        raise RuntimeError(f"{desc}: a worker returned {len(out)} results for {len(batch)} tasks")
                    results.put(out)
                results.put(done)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                results.put(exc)

        producer = threading.Thread(target=produce, name=f"mcie-{desc}", daemon=True)
        producer.start()
        try:
            with tqdm(total=len(tasks), desc=desc, unit="task", disable=not self.progress, leave=False) as bar:
                while (item := results.get()) is not done:
                    if isinstance(item, BaseException):
                        raise item
                    bar.update(len(item))
                    yield item
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue, then let it finish
                with contextlib.suppress(queue.Empty):
                    results.get(timeout=0.1)
            producer.join()


class _RayWorker:
    """A Ray actor: builds the work function once, then maps pickled task batches to pickled results."""

    def __init__(self, factory: WorkerFactory) -> None:
        self.work = factory()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        tasks = [pickle.loads(blob) for blob in batch["task"]]
        results = self.work(tasks)
        out = np.empty(len(results), dtype=object)
        out[:] = [pickle.dumps(r) for r in results]
        return {"index": batch["index"], "result": out}


class RayEngine:
    """Runs the work in Ray actors over a Ray Dataset; ``address=None`` starts a local Ray (CI uses 2 CPUs)."""

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        workers: int = 2,
        num_gpus_per_worker: float = 0.0,
        progress: bool = True,
    ) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is in the dev and scale extras
            raise RuntimeError("the ray engine needs Ray: pip install 'mcie[scale]'") from exc
        self.ray = ray
        if not ray.is_initialized():
            ray.init(
                address=address,
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                ignore_reinit_error=True,
            )
        if workers < 1:
            raise ValueError(f"--ray-workers: expected at least 1, got {workers}")
        self.workers = workers
        self.num_gpus_per_worker = num_gpus_per_worker
        self.progress = progress

    def map_batches(
        self, factory: WorkerFactory, tasks: Sequence[Any], *, batch_size: int, desc: str
    ) -> Iterator[list[Any]]:
        if not tasks:
            return
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = self.progress
        items = [{"index": i, "task": pickle.dumps(task)} for i, task in enumerate(tasks)]
        blocks = max(1, min(len(items), max(self.workers, len(items) // batch_size), 64))
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        mapped = dataset.map_batches(
            _RayWorker,
            fn_constructor_args=(factory,),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_gpus=self.num_gpus_per_worker or None,
            batch_format="numpy",
        )
        pending: dict[int, Any] = {}
        next_index = 0
        batch: list[Any] = []
        for row in mapped.iter_rows():
            pending[int(row["index"])] = pickle.loads(row["result"])
            while next_index in pending:
                batch.append(pending.pop(next_index))
                next_index += 1
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if pending:
            raise RuntimeError(f"{desc}: Ray returned results out of range: {sorted(pending)[:5]}")
        if batch:
            yield batch
        if next_index != len(tasks):
            raise RuntimeError(f"{desc}: Ray returned {next_index} results for {len(tasks)} tasks")

    def shutdown(self) -> None:
        self.ray.shutdown()


def make_stage_engine(kind: str, **options: Any) -> Engine:
    if kind == "local":
        return LocalEngine(progress=options.get("progress", True))
    if kind == "ray":
        return RayEngine(**options)
    raise ValueError(f"--engine: expected local or ray, got {kind!r}")
