"""The `tandem` command. Each subcommand is one service or tool; the heavy imports happen only
inside the subcommand that needs them, so `tandem --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "make-test-model": ("tandem.engine.make_model",
                        "write a HF-layout model dir with random weights and a trained tokenizer"),
    "generate": ("tandem.engine.generate_cli", "generate text offline with the engine"),
    "prefill": ("tandem.prefill.server", "run a prefill worker (gRPC + /metrics)"),
    "decode": ("tandem.decode.server", "run a decode worker (gRPC + /metrics); also prefills short prompts"),
    "router": ("tandem.router.cli", "run the router: OpenAI HTTP API + tandem.v1.Router gRPC in front "
                                    "of the prefill and decode pools"),
    "serve": ("tandem.serve.cli", "run router + prefill + decode workers on this machine, supervised "
                                  "(local processes or Ray)"),
}
# subcommand -> (module with main(argv), help): tools that own their whole argument parsing
DELEGATED = {
    "operator": ("tandem.operator.cli", "run the Kubernetes operator (kopf)"),
    "bench": ("tandem.bench_cli", "benchmarks: `tandem bench engine` (offline), `tandem bench serve` (HTTP), `tandem bench headline` (end-to-end comparisons)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="tandem", description="Tandem: disaggregated prefill/decode LLM serving.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in {**COMMANDS, **DELEGATED}.items():
        sub.add_parser(name, help=help_, add_help=False)
    # Delegated tools parse their own arguments (they have sub-subcommands of their own).
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] in DELEGATED:
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        mod = importlib.import_module(DELEGATED[argv[first]][0])
        return int(mod.main(argv[first + 1:]) or 0)
    if first is None or argv[first] not in COMMANDS:
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if args.command is None else 2
    name = argv[first]
    mod = importlib.import_module(COMMANDS[name][0])
    p = argparse.ArgumentParser(prog=f"tandem {name}", description=COMMANDS[name][1])
    mod.add_arguments(p)
    args = p.parse_args(argv[first + 1:])
    level = next((argv[i + 1] for i, a in enumerate(argv[:first]) if a == "--log-level"), "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
