"""Data parallel evaluation: `torchrun --nproc-per-node N -m nsa_eval run ...`.

Every process loads its own copy of the model (one per GPU, `cuda:LOCAL_RANK`, with NCCL; on CPUs, gloo) and
builds the same samples; process R answers the samples whose index i has i % N == R and appends them to
`samples/shards/<task>.rank<R>.jsonl`. When all are done, rank 0 merges the shards into `samples/<task>.jsonl`
(the file reports read, in sample order), deletes the shards and writes metrics.json, so the run directory ends
as a one-process run leaves it. A run stopped midway resumes with any number of processes: a sample counts as
done when the merged file or any shard holds it. Sampling seeds depend on the run seed and the sample id only,
so N processes give the metrics one process gives.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from nsa_eval.records import RunInfo, SampleRecord, read_samples, shard_file, shard_files, write_samples
from nsa_eval.store import RunStore

# A rank that finishes early waits at the final barrier for the slowest one: allow a long evaluation.
BARRIER_TIMEOUT = timedelta(days=2)


@dataclass
class Shard:
    """This process's place in a data-parallel run (torchrun's RANK, WORLD_SIZE and LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int
    nccl: bool

    def device(self, requested: str) -> str:
        """The device this process's model goes to: its own GPU under NCCL, else what was asked."""
        return f"cuda:{self.local_rank}" if self.nccl else requested

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        dist.barrier(device_ids=[self.local_rank]) if self.nccl else dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]



def start(device: str) -> Shard | None:
    """Join the process group torchrun set up (NCCL when the model goes to GPUs, else gloo); None when this
    process runs alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        return None
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    nccl = device != "cpu" and torch.cuda.is_available()
    if nccl:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                             "give torchrun --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if nccl else "gloo", timeout=BARRIER_TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return Shard(rank, world_size, local_rank, nccl)


def run_store(root: str | Path, shard: Shard | None, **options: Any) -> RunStore:
    """This process's view of the run directory: sharded in a data-parallel run, and also for one process
    resuming a data-parallel run that stopped before merging its shards; else the plain RunStore.
    options: RunStore's settings and overwrite."""
    if shard is None:
        if not (Path(root) / "samples" / "shards").is_dir():
            return RunStore(root, **options)
        shard = Shard(rank=0, world_size=1, local_rank=0, nccl=False)
    return ShardedRunStore(shard.broadcast(Path(root)), shard, **options)


class ShardedRunStore(RunStore):
    """The run directory as one process of a data-parallel run uses it (see the module docstring)."""

    def __init__(self, root: str | Path, shard: Shard, **options: Any):
        super().__init__(root, **options)
        self.shard = shard

    def samples_path(self, task: str) -> Path:
        """This process's shard: where `append` writes and whose torn last line `finished_ids` cuts off."""
        return shard_file(self.root, task, self.shard.rank)

    @property
    def shard_dir(self) -> Path:
        return self.root / "samples" / "shards"

    def merged_path(self, task: str) -> Path:
        return super().samples_path(task)

    def lock(self) -> None:
        """Process 0 holds the folder for the whole data-parallel run."""
        if self.shard.rank == 0:
            super().lock()

    def open(self, run_info: RunInfo) -> None:
        """Rank 0 creates or checks the run (as one process would); the others wait for it, then check it too."""
        if self.shard.rank == 0:
            super().open(run_info)
            self.update_run(world_size=self.shard.world_size)
            self.shard_dir.mkdir(exist_ok=True)
        self.shard.barrier()
        if self.shard.rank != 0:
            existing = self._existing()
            if existing is None or existing.config_hash != run_info.config_hash:
                raise ValueError(f"process {self.shard.rank} built a different run configuration than process 0; "
                                 "give every process the same command line")

    def owns(self, index: int) -> bool:
        return index % self.shard.world_size == self.shard.rank

    def finished_ids(self, task: str) -> set[str]:
        """Done anywhere: this shard (a torn last line cut off), the merged file, or another process's shard
        (from an earlier run with other ranks; read, never cut)."""
        done = super().finished_ids(task)
        for path in [self.merged_path(task), *shard_files(self.root, task)]:
            if path != self.samples_path(task):
                done.update(record.id for record in read_samples(path))
        return done

    def records(self, task: str) -> list[SampleRecord]:
        return read_samples(self.merged_path(task), strict=True)

    def gather(self, order: dict[str, list[str]]) -> bool:
        """Wait for every process; rank 0 merges each task's shards into samples/<task>.jsonl in `order`
        (sample ids) and deletes them. Returns whether this process writes the metrics."""
        self.shard.barrier()
        if self.shard.rank != 0:
            return False
        for task, ids in order.items():
            shards = shard_files(self.root, task)
            merged: dict[str, SampleRecord] = {}
            for path in [self.merged_path(task), *shards]:
                for record in read_samples(path):
                    merged.setdefault(record.id, record)
            write_samples(self.merged_path(task), list(merged.values()), ids)
            for path in shards:
                path.unlink()
        if self.shard_dir.is_dir() and not any(self.shard_dir.iterdir()):
            self.shard_dir.rmdir()  # the run directory ends as a one-process run leaves it
        return True

