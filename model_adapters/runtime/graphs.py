"""CUDA graphs of the decode step: one per key (rows, compress, head) over a cache's tensors, captured after the
key's first eager call and replayed from then on. A capture that fails leaves its key eager (a warning, no error);
on the CPU, or with graphs off, every call is eager."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch


class DecodeGraphs:
    """The captured decode steps of one cache: {key: (graph or "off", the graph's output tensor)}. A replay returns
    the graph's own output tensor, valid until the next replay of that key."""

    def __init__(self) -> None:
        self.captured: dict[Any, tuple[Any, torch.Tensor | None]] = {}

    def decode(self, key: Any, step: Callable[[], torch.Tensor], device: torch.device,
               enabled: bool = True) -> torch.Tensor:
        """step() eagerly (CPU, graphs off, or a key whose capture failed), or from the key's graph on CUDA: eager on
        a side stream the first time (which also compiles its kernels), then captured; replayed afterwards."""
        graph, out = self.captured.get(key, (None, None))
        if device.type != "cuda" or not enabled or graph == "off":
            return step()
        if graph is not None:
            graph.replay()
            return out  # type: ignore[return-value]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # this token's step, eager
            out = step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()  # capture records the step's kernels without running them
        try:
            with torch.cuda.graph(graph):
                self.captured[key] = (graph, step())
        except RuntimeError as error:  # leave this shape eager rather than fail the generation
            warnings.warn(f"CUDA graph capture of the decode step failed, decoding eagerly: {error}")
            self.captured[key] = ("off", None)
        return out
