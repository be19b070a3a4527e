"""A TCP forwarder: pods on the real node reach the loopback-only API server through the bridge address.

The API server listens on 127.0.0.1 only (nothing of the local cluster is exposed beyond this host), but a
pod's 127.0.0.1 is its own. In-cluster clients (an operator installed by Helm, anything using its
ServiceAccount token) dial the ``kubernetes`` Service, which kube-proxy sends to the endpoint the harness
publishes: ``<node ip>:<API server port>``, where this process listens and relays the bytes to
``127.0.0.1:<API server port>`` untouched (TLS end to end; the API server's certificate names the node ip
and the Service's cluster IP).

``python -m fieldkube.localcluster.forward LISTEN_HOST:PORT TARGET_HOST:PORT``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

log = logging.getLogger("fieldkube.localcluster.forward")
CHUNK = 64 * 1024


def host_port(text: str) -> tuple[str, int]:
    """``"10.0.0.1:443"`` → ``("10.0.0.1", 443)``; a clear error for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _relay(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, target: tuple[str, int]
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError as exc:
        log.warning("cannot reach %s:%d: %s", *target, exc)
        client_writer.close()
        return
    try:
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
    finally:
        for writer in (client_writer, upstream_writer):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    """Relay every connection to ``listen`` to ``target`` until SIGTERM or SIGINT."""
    server = await asyncio.start_server(lambda r, w: _relay(r, w, target), *listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("forwarding %s:%d -> %s:%d", *listen, *target)
    async with server:
        await stop.wait()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("listen", type=host_port, help="address to listen on, HOST:PORT")
    parser.add_argument("target", type=host_port, help="address to relay to, HOST:PORT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args.listen, args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
