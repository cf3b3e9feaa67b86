"""KV transfer throughput between two processes on a Llama-3.1-8B-shaped layout.

    python -m tandem.kvtransfer.bench --backend nixl --device cuda --src-gpu 0 --dst-gpu 1
    python -m tandem.kvtransfer.bench --backend nixl,tcp --device cpu --blocks 128

A prefill process (source kv) and a decode process (destination kv) run one engine each; every
iteration creates a receiver, then times create_sender -> all layers -> finish -> ack (DONE) in
the prefill process, with the decode process polling meanwhile. "contiguous" moves N blocks that
are consecutive on both sides (one descriptor per layer); "random" scatters them so that no two
merge (N descriptors per layer), the worst case for page-table fragmentation. On CUDA a plain
torch device-to-device copy of the same number of bytes runs in the same session for scale.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from .layout import KVLayout
from .testing import PeerProcess


def _patterns(name: str, n: int, pool: int, rng: random.Random) -> tuple[list[int], list[int]]:
    if name == "contiguous":
        return list(range(1, n + 1)), list(range(pool - n, pool))
    if name == "random":
        # Every other block, shuffled: no pair is consecutive on both sides, so nothing merges.
        src, dst = list(range(1, 2 * n + 1, 2)), list(range(1, 2 * n + 1, 2))
        rng.shuffle(src), rng.shuffle(dst)
        return src, dst
    raise ValueError(f"unknown pattern {name!r}")


def run(args: argparse.Namespace) -> list[dict]:
    lay = KVLayout(args.layers, args.pool_blocks or 2 * args.blocks + 2, args.block_size,
                   args.kv_heads, args.head_dim, args.dtype)
    nbytes = args.blocks * lay.num_layers * lay.block_bytes
    src_dev = "cpu" if args.device == "cpu" else f"cuda:{args.src_gpu}"
    dst_dev = "cpu" if args.device == "cpu" else f"cuda:{args.dst_gpu}"
    rows, rng = [], random.Random(0)
    cfg = {"transfer_timeout_s": 60.0, "bootstrap_timeout_s": 60.0}
    for backend in args.backend.split(","):
        decode = PeerProcess(backend, lay, device=dst_dev, config=cfg, name=f"bench-decode-{backend}")
        prefill = PeerProcess(backend, lay, device=src_dev, config=cfg, name=f"bench-prefill-{backend}")
        try:
            prefill.call("connect", decode.info)
            decode.call("connect", prefill.info)
            prefill.call("fill", seed=1)
            decode.call("fill", value=0.0)
            for pattern in args.pattern.split(","):
                src, dst = _patterns(pattern, args.blocks, lay.num_blocks, rng)
                times, descs = [], 0
                for it in range(args.iters + 1):  # iteration 0 warms up connections and pages
                    rid = f"{backend}-{pattern}-{it}"
                    decode.call("receiver", rid, dst, prefill.name)
                    decode.start("wait", "rx", rid, 120)
                    tx = prefill.call("transfer", decode.name, rid, src, dst,
                                      layerwise=not args.all_layers, timeout=120)
                    rx = decode.result(timeout=180)
                    if tx["state"] != "DONE" or rx["state"] != "DONE":
                        raise RuntimeError(f"{rid}: sender {tx}, receiver {rx}")
                    if it == 0:
                        if prefill.call("digest", src) != decode.call("digest", dst):
                            raise RuntimeError(f"{rid}: destination differs from source")
                        continue
                    times.append(tx["seconds"])
                    descs = tx["descriptors"]
                rows.append({"what": f"{backend} {pattern}", "path": f"{src_dev}->{dst_dev}",
                             "mib": nbytes / 2**20, "descs": descs, "best": min(times),
                             "median": statistics.median(times)})
            if args.device == "cuda" and backend == args.backend.split(",")[-1]:
                gbps = prefill.call("p2p_copy", nbytes, args.src_gpu, args.dst_gpu, args.iters,
                                    timeout=120)
                rows.append({"what": "torch p2p copy_", "path": f"{src_dev}->{dst_dev}",
                             "mib": nbytes / 2**20, "descs": 1, "best": nbytes / gbps / 1e9,
                             "median": float("nan")})
        finally:
            prefill.close()
            decode.close()
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"# {args.blocks} blocks x {args.layers} layers, block {args.block_size}, "
          f"{args.kv_heads} kv heads, head_dim {args.head_dim}, {args.dtype}; "
          f"{'all layers at once' if args.all_layers else 'layer by layer'}; "
          f"{args.iters} timed iterations; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'transfer':<22}{'path':<20}{'MiB':>8}{'descs':>7}{'best ms':>10}{'med ms':>10}"
          f"{'GB/s best':>11}{'GB/s med':>10}")
    for r in rows:
        b = r["mib"] * 2**20 / 1e9
        print(f"{r['what']:<22}{r['path']:<20}{r['mib']:>8.0f}{r['descs']:>7}"
              f"{r['best'] * 1e3:>10.2f}{r['median'] * 1e3:>10.2f}"
              f"{b / r['best']:>11.2f}{b / r['median']:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="nixl", help="nixl, tcp or a comma list")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--src-gpu", type=int, default=0)
    ap.add_argument("--dst-gpu", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=256, help="blocks moved per transfer (x16 tokens)")
    ap.add_argument("--pool-blocks", type=int, default=0, help="blocks in each kv pool (2N+2)")
    ap.add_argument("--pattern", default="contiguous,random")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--all-layers", action="store_true", help="one send_layers() call, not per layer")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="also write the rows (with GB/s) to this file")
    args = ap.parse_args(argv)
    rows = run(args)
    print_table(rows, args)
    if args.json:
        import json
        for r in rows:
            gb = r["mib"] * 2**20 / 1e9
            r["gbps_best"] = gb / r["best"]
            r["gbps_median"] = gb / r["median"] if r["median"] == r["median"] else None
            r["median"] = r["median"] if r["median"] == r["median"] else None  # JSON has no NaN
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
