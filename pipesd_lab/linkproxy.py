"""The emulated link as a real TCP proxy: put any link between a real edge and a real verifier.

    pipesd link --upstream 127.0.0.1:8000 --listen 127.0.0.1:9000 --scenario s1
    pipesd generate "def f(x):" --verifier http://127.0.0.1:9000 --verifier-key ...

Every chunk read from one side goes through the same ``SerialLink`` model as the in-process
emulator (bandwidth or trace, propagation delay, jitter, loss as a retransmission delay) and is
written to the other side when it would have arrived. All connections share one uplink and one
downlink, as they would share a radio. Bytes are the real bytes on the wire (HTTP and sealed
frames); the in-process emulator's extra per-token payload has no meaning here. When the link is
cut (``set_down``), open connections are reset and new ones are refused, as a dead radio would do.
"""

from __future__ import annotations

import asyncio
import threading

from .emulation import LinkDown, LinkProfile, SerialLink

CHUNK = 16 * 1024


class LinkProxy:
    """A TCP proxy on loopback (or any address) that shapes traffic with a ``LinkProfile``."""

    def __init__(self, upstream: tuple[str, int], profile: LinkProfile, listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.upstream, self.profile, self.listen = upstream, profile, listen
        self.up = SerialLink(profile, 1)
        self.down = SerialLink(profile, 2)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.bytes_up = self.bytes_down = 0

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.port}"

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> "LinkProxy":
        started = threading.Event()

        failure: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, *self.listen))
            except OSError as exc:          # e.g. the port is taken: reported to start()'s caller
                failure.append(exc)
                started.set()
                self._loop.close()
                self._loop = None
                return
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="link-proxy", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("link proxy did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def serve_forever(self) -> None:
        """Block until interrupted (the CLI); starts the proxy if it is not running."""
        if self._loop is None:
            self.start()
        try:
            self._thread.join()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def set_down(self, down: bool = True) -> None:
        """Cut the link (reset open connections, refuse new ones) or bring it back."""
        self.up.cut = self.down.cut = down
        if down and self._loop is not None:
            def reset_all():
                for w in list(self._writers):
                    w.transport.abort()
            self._loop.call_soon_threadsafe(reset_all)

    def __enter__(self) -> "LinkProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- relaying -------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.up.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pump(reader, up_writer, self.up, "bytes_up"),
                                 self._pump(up_reader, writer, self.down, "bytes_down"))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, reader, writer, link: SerialLink, counter: str) -> None:
        """Read chunks as they come; a second task writes each when the link would deliver it."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                arrival, chunk = item
                delay = arrival - link.clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        try:
            while chunk := await reader.read(CHUNK):
                _, _, arrival = link.reserve(len(chunk))
                setattr(self, counter, getattr(self, counter) + len(chunk))
                queue.put_nowait((arrival, chunk))
            queue.put_nowait(None)
            await sender
        except (LinkDown, ConnectionError):
            sender.cancel()
            writer.transport.abort()
