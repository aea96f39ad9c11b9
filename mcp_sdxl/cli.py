"""`mcp-sdxl` command line: serve, demo, doctor, enroll, build-tiny, bench."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", help="folder with the YAML configs (env MCP_SDXL_CONFIG)")
    parser.add_argument("--home", help="data folder: outputs, inputs, references, tiny engine (env MCP_SDXL_HOME)")
    parser.add_argument("--models-root", help="base for relative model paths (env MCP_SDXL_MODELS)")
    parser.add_argument("--profile", choices=["auto", "sdxl", "tiny"], help="engine profile (env MCP_SDXL_PROFILE)")
    parser.add_argument("-v", "--verbose", action="store_true")


def _settings(args):
    from mcp_sdxl.config import load_settings

    return load_settings(args.config_dir, args.home, args.models_root, args.profile)


def _parse_http(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise argparse.ArgumentTypeError("use HOST:PORT, e.g. 127.0.0.1:8765 or [::1]:8765")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address as URLs write it
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-sdxl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    _common(serve)
    serve.add_argument("--http", type=_parse_http, metavar="HOST:PORT", help="serve streamable HTTP at /mcp instead of stdio")
    serve.add_argument("--token", default=os.environ.get("MCP_SDXL_TOKEN"), help="require this bearer token on HTTP (env MCP_SDXL_TOKEN)")

    demo = sub.add_parser("demo", help="run the whole agent flow through a real MCP client and write a gallery")
    _common(demo)
    demo.add_argument("--out", help="gallery folder (default <home>/demo)")

    doctor = sub.add_parser("doctor", help="print what is installed and configured")
    _common(doctor)

    enroll = sub.add_parser("enroll", help="add reference face images for a character")
    _common(enroll)
    enroll.add_argument("character")
    enroll.add_argument("images", nargs="+")

    tiny = sub.add_parser("build-tiny", help="build the tiny engine's model, LoRAs and ControlNets now")
    _common(tiny)

    bench = sub.add_parser("bench", help="GPU benchmark: plain diffusers vs this engine")
    _common(bench)
    bench.add_argument("--out", default="bench.json", help="JSON results file")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--vram-limit-gb", type=float, default=None)
    bench.add_argument("--quick", action="store_true", help="fewer scenarios (smoke test)")
    bench.add_argument("--variants", help="engine lever variants, e.g. 'default:all,eager:base+loras3' (see mcp_sdxl/bench/plan.py)")
    bench.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this many seconds")
    bench.add_argument("--workdir", help="where random weights and LoRAs are built (default <home>/bench)")
    bench.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process start-up measurements")
    bench.add_argument("--cold-start-only", action="store_true",
                       help="only the fresh-process start-ups, with the first --variants entry's levers")
    bench.add_argument("--memory-blocks", action="store_true",
                       help="record where live GPU memory was allocated and list the biggest in each snapshot (slower)")
    bench.add_argument("--reference", help="reference scenarios to run, e.g. 'base+loras3' (default: all the variants need)")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,  # libraries: their warnings and errors only
        stream=sys.stderr,  # stdout belongs to the MCP stdio transport
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mcp_sdxl").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from mcp_sdxl.errors import ConfigError

    try:
        return _run(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "serve":
        return serve(args)
    if args.command == "demo":
        from mcp_sdxl.demo import run_demo

        return run_demo(args)
    if args.command == "doctor":
        from mcp_sdxl.doctor import doctor

        return doctor(_settings(args))
    if args.command == "enroll":
        return enroll(args)
    if args.command == "build-tiny":
        from mcp_sdxl.engine import tiny_profile

        settings = _settings(args)
        paths = tiny_profile.build_all(settings)
        for path in paths:
            print(path)
        return 0
    if args.command == "bench":
        from mcp_sdxl.bench import run_bench

        return run_bench(args)
    return 1


def serve(args) -> int:
    from mcp_sdxl.lease import install_signal_handlers
    from mcp_sdxl.server import build_server
    from mcp_sdxl.studio import Studio

    settings = _settings(args)
    studio = Studio(settings)
    # SIGTERM/SIGHUP: cancel the jobs (each stops within a denoising step and keeps nothing), unload the
    # engine and hand the GPU back, then the process dies of the signal. close() is safe to run twice.
    install_signal_handlers(studio.lease, on_shutdown=studio.close)
    server = build_server(studio)
    log = logging.getLogger("mcp_sdxl")
    log.info("engine profile %s (%s), outputs in %s", studio.engine.profile, studio.engine.model_name, settings.output_dir)
    try:
        if args.http:
            host, port = args.http
            from mcp_sdxl.server.http import run_http

            run_http(server, host, port, token=args.token)
        else:
            server.run()
    finally:
        studio.close()
    # The client is gone and everything is released and written. Interpreter teardown with torch and
    # diffusers loaded takes seconds, and stdio clients (the SDK, Claude Desktop) send SIGTERM 2 s after
    # closing stdin: end now, cleanly, instead of being killed halfway through that teardown.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe has nothing left to flush
            stream.flush()
    os._exit(0)


def enroll(args) -> int:
    from mcp_sdxl.studio import Studio

    settings = _settings(args)
    studio = Studio(settings)
    try:
        from mcp_sdxl.errors import UserInputError

        try:
            result = studio.enroll_files(args.character, args.images)  # the enroll_reference tool's path
        except UserInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for path in result["added"]:
            print(path)
        return 0
    finally:
        studio.close()


if __name__ == "__main__":
    sys.exit(main())
