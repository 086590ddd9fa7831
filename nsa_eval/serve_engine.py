"""The engine thread of `nsa-eval serve` (nsa_eval/serve.py): one EngineWorker runs the native engine's
generate_iter for every client, taking requests that arrive while a batch decodes (continuous batching), and each
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
    """One thread that runs the engine for every client: it waits for a request, then runs generate_iter with the
    requests that arrive meanwhile polled each step (`more`), so concurrent requests decode in one batch, and reports
    each token and each finished Generation to the request's Listener. `lock`: held while the engine runs (the
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
        while True:
            batch = [self.inbox.get()]  # wait for work
            listeners = [listener for _, listener in batch]

            def more() -> list[GenerationRequest]:
                if self.stopping.is_set():
                    raise ShuttingDown()
                arrived = []
                while True:
                    try:
                        arrived.append(self.inbox.get_nowait())
                    except queue.Empty:
                        listeners.extend(listener for _, listener in arrived)
                        return [request for request, _ in arrived]

            def on_token(index: int, sample: int, tokens: list[int], done: bool) -> None:
                if self.stopping.is_set():
                    raise ShuttingDown()
                listeners[index].queue.put((sample, list(tokens)))

            self.idle.clear()
            try:
                if self.stopping.is_set():
                    raise ShuttingDown()
                with self.lock:
                    for index, generation in self.model.generate_iter([r for r, _ in batch], more=more,
                                                                      on_token=on_token):
                        listeners[index].queue.put(generation)
            except Exception as error:  # noqa: BLE001 - every waiting client gets the error; the worker goes on
                if not isinstance(error, ShuttingDown):
                    traceback.print_exc(file=sys.stderr)
                for listener in listeners:
                    listener.queue.put(error)
            finally:
                self.idle.set()
