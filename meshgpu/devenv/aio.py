"""asyncssh beside trio: one asyncio event loop in a daemon thread of the agent.

asyncssh is asyncio-only. The agent runs trio, so the SSH server lives on its own asyncio loop
in a thread (python-stack-notes §4: stock asyncio, asyncssh used as written, the data path never
crosses into trio). The two meet in two narrow places:

- trio -> asyncio: ``await bridge.run(coro)`` runs a coroutine on the loop and waits for it;
  a trio cancellation cancels the asyncio task.
- asyncio -> trio: ``await bridge.call_trio(fn, *args)`` (from asyncio) runs a plain function
  on the trio loop and returns its result: the replicated state, the SessionTracker and
  anything else "event loop only" is read and changed there, never from the asyncio thread;
  ``bridge.notify_trio(fn, *args)`` does the same without waiting (in order);
  ``await bridge.call_trio_async(afn, *args)`` awaits an async function there (a trio system
  task: ``afn`` bounds its own time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncioThread:
    def __init__(self, name: str = "asyncio") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        """Start the loop (call from trio: the bridge remembers the trio loop it came from)."""
        self._token = trio.lowlevel.current_trio_token()
        self.loop = loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the asyncio loop and wait (from trio)."""
        assert self.loop is not None and self._token is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = self._token

        def wake(_: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            fut.cancel()  # trio cancelled us: cancel the asyncio task too
            raise
        return fut.result()

    async def call_trio(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the trio loop and return its result (from asyncio)."""
        assert self.loop is not None and self._token is not None
        loop = self.loop
        fut: asyncio.Future[T] = loop.create_future()

        def call() -> None:
            try:
                value = fn(*args)
            except BaseException as e:  # handed to the asyncio caller
                loop.call_soon_threadsafe(_settle, fut, None, e)
            else:
                loop.call_soon_threadsafe(_settle, fut, value, None)

        try:
            self._token.run_sync_soon(call)
        except trio.RunFinishedError:
            raise ConnectionAbortedError("the agent is stopping") from None
        return await fut

    async def call_trio_async(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``afn(*args)`` on the trio loop and return its result (from asyncio)."""
        assert self.loop is not None and self._token is not None
        loop = self.loop
        fut: asyncio.Future[T] = loop.create_future()

        async def task() -> None:
            try:
                value = await afn(*args)
            except Exception as e:  # handed to the asyncio caller
                loop.call_soon_threadsafe(_settle, fut, None, e)
            except BaseException:  # trio is ending (Cancelled): the caller hears of it
                why = ConnectionAbortedError("the agent is stopping")
                loop.call_soon_threadsafe(_settle, fut, None, why)
                raise
            else:
                loop.call_soon_threadsafe(_settle, fut, value, None)

        try:
            self._token.run_sync_soon(trio.lowlevel.spawn_system_task, task)
        except trio.RunFinishedError:
            raise ConnectionAbortedError("the agent is stopping") from None
        return await fut

    def notify_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the trio loop soon, in order; errors are logged (from asyncio)."""
        assert self._token is not None

        def call() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", getattr(fn, "__name__", fn))

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(call)

    def close(self) -> None:
        """Cancel what runs on the loop, stop it and join the thread (blocking: from a worker
        thread or at shutdown)."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return

        async def cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()
        self.loop = self._thread = None


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
