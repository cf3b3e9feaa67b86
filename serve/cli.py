"""`tandem serve`: a router plus N prefill and M decode workers on this machine, supervised.

Flags -> `config.resolve()` (demo model, device/GPUs, KV-transfer backend, ports) -> a launcher
(local subprocesses, or Ray actors) -> `Supervisor.run()`: start, wait for /ready with progress,
print the OpenAI base URL and an example curl, restart what dies, stop everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from tandem.serve import config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Start a whole Tandem deployment on this machine: the router (OpenAI API) and N prefill "
        "and M decode workers, each its own process running the same command a Kubernetes pod "
        "runs (`tandem router|prefill|decode ...`). Waits until all are ready, then prints the "
        "base URL. Workers that die are restarted with backoff; Ctrl-C or SIGTERM drains and "
        "stops everything. With no --model a small demo model is generated on first use, so "
        "this works offline on a CPU-only machine.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "examples:\n"
        "  tandem serve                                  # demo model, 1 prefill + 1 decode, CPU or GPU\n"
        "  tandem serve --model ./Llama-3.1-8B --prefill 2 --decode 2 --port 8000\n"
        "  tandem serve --launcher ray --ray-address auto  # the same roles as actors on a Ray cluster\n"
        "then: OpenAI clients with base_url http://127.0.0.1:8000/v1 (any API key)")
    config.add_arguments(p)
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for every process to be ready, model loading included "
                        "(default 900)")


def run(args: argparse.Namespace) -> int:
    cfg = config.resolve(args)
    cfg.log_dir = cfg.log_dir or tempfile.mkdtemp(prefix="tandem-serve-")
    os.makedirs(cfg.log_dir, exist_ok=True)
    from tandem.serve.supervisor import LocalLauncher, Supervisor
    if cfg.launcher == "ray":
        from tandem.serve.ray_launcher import RayLauncher
        launcher = RayLauncher(cfg)
    else:
        launcher = LocalLauncher()
    sup = Supervisor(cfg, launcher, cfg.log_dir, status_file=args.status_file,
                     ready_timeout=args.ready_timeout, out=lambda s: print(s, flush=True))
    sup.install_signal_handlers()
    return sup.run()
