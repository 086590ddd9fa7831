"""The engine thread of `nsa-eval serve` (nsa_eval/serve.py): one EngineWorker steps the native engine for
every client (add_request, step), taking requests that arrive while a batch decodes (continuous batching), and each
request's HTTP thread waits on its Listener for tokens and the finished Generation."""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from typing import Any, Iterator

from nsa_eval.model_adapters.base import Generation, GenerationRequest
from nsa_eval.openai_schema import ShuttingDown


class Listener:
    """What one request's HTTP thread waits on: (sample, tokens so far) after each token, then its Generation (or the
    error that ended the batch)."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def events(self) -> Iterator[tuple[int, list[int]] | Generation]:
        while True:
            event = self.queue.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Generation):
                return

    def result(self) -> Generation:
        for event in self.events():
            if isinstance(event, Generation):
                return event
        raise AssertionError("a listener's events end with its Generation")


class EngineWorker:
    """One thread that runs the engine for every client: it waits for a request, then steps the engine, adding the
    requests that arrive meanwhile before each step, so concurrent requests decode in one batch, and reports each
    token and each finished Generation to the request's Listener. `lock`: held while the engine runs (the
    server's log-probability forward passes take it too)."""

    def __init__(self, model: Any, lock: threading.Lock):
        self.model, self.lock = model, lock
        self.inbox: queue.Queue = queue.Queue()
        self.stopping = threading.Event()  # set by stop(): the engine raises ShuttingDown at its next step
        self.idle = threading.Event()  # set while the engine runs no batch
        self.idle.set()
        threading.Thread(target=self._run, name="nsa-eval-engine", daemon=True).start()

    def submit(self, request: GenerationRequest) -> Listener:
        listener = Listener()
        if self.stopping.is_set():
            listener.queue.put(ShuttingDown())
        else:
            self.inbox.put((request, listener))
        return listener

    def stop(self, timeout: float) -> None:
        """Stop the batch being decoded (its clients get ShuttingDown) and refuse new requests; wait until the engine
        has left its step (at most `timeout` s), so no engine code runs while the process exits."""
        self.stopping.set()
        while True:
            try:
                _, listener = self.inbox.get_nowait()
            except queue.Empty:
                break
            listener.queue.put(ShuttingDown())
        self.idle.wait(timeout)

    def _run(self) -> None:
        listeners: dict[int, Listener] = {}  # by the engine's request index
        while True:
            self._add(*self.inbox.get(), listeners)  # wait for work
            self.idle.clear()
            try:
                with self.lock:
                    self.model.reserve(self.model.max_length + 1)  # any request fits without a regrowth
                    while True:
                        while True:  # the requests that arrived meanwhile join the batch
                            try:
                                self._add(*self.inbox.get_nowait(), listeners)
                            except queue.Empty:
                                break
                        if self.stopping.is_set():
                            raise ShuttingDown()
                        if not self.model.has_unfinished():
                            break
                        out = self.model.step()
                        for update in out.tokens:
                            # a snapshot: the engine's row keeps growing
                            listeners[update.index].queue.put((update.sample, list(update.tokens)))
                        for index, generation in out.finished:
                            listeners.pop(index).queue.put(generation)
            except Exception as error:  # noqa: BLE001 - every waiting client gets the error; the worker goes on
                if not isinstance(error, ShuttingDown):
                    traceback.print_exc(file=sys.stderr)
                self.model.abort()
                for listener in listeners.values():
                    listener.queue.put(error)
                listeners.clear()
            finally:
                self.idle.set()

    def _add(self, request: GenerationRequest, listener: Listener, listeners: dict[int, Listener]) -> None:
        """A request into the engine; one the engine refuses (ValueError: no room for its prompt) gets the error."""
        try:
            listeners[self.model.add_request(request)] = listener
        except ValueError as error:
            listener.queue.put(error)
