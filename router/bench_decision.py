"""Decision-latency benchmark of the router's placement: `python -m tandem.router.bench_decision
--replicas 16 --blocks 100000`.

What runs: a `ReplicaPlacement` with ``--replicas`` prefill and ``--decode`` decode replicas
(static endpoints, no network: health and load are set directly). Its prefix index is filled
through the same code path as the workers' KVEvents streams (`PrefixIndex.apply_batch` over
``tandem.v1.KVEventBatch`` messages): ``--groups`` shared prefixes ("system prompts", up to
``--prefix-blocks`` blocks each) are spread over the replicas, each replica caching random
groups to random depths until ``--blocks`` (replica, block) entries are stored in all.

Then, per prompt length, ``--iters`` calls of `choose(token_ids)` (cache-aware, metrics included)
on prompts that share a random depth of a random group's prefix followed by fresh tokens
("hit"), or share nothing ("miss"). Reported: p50/p99/mean decision latency, and the part of it
spent hashing the prompt (the chained BLAKE2b hashes of the blocks walked), measured separately.
Columns: matched = mean prompt tokens the chosen prefill replica caches; walked = mean blocks
hashed and looked up per decision (the walk stops at the first block no candidate holds).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from tandem.proto import worker_pb2 as pb
from tandem.router.discovery import StaticDiscovery
from tandem.router.index import iter_chain_hashes
from tandem.router.placement import ReplicaPlacement


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def build(args, rng: random.Random) -> tuple[ReplicaPlacement, list[list[int]], float]:
    bs = args.block_size
    pre = [f"10.0.0.{i}:50061" for i in range(args.replicas)]
    dec = [f"10.0.1.{i}:50061" for i in range(args.decode)]
    pl = ReplicaPlacement(StaticDiscovery(pre, dec), policy=args.policy, block_size=bs, model="bench")
    pl.set_endpoints("prefill", pre)
    pl.set_endpoints("decode", dec)
    for pool in ("prefill", "decode"):
        for r in pl.replicas(pool):
            r.healthy = True
            r.total_blocks, r.free_blocks = 100_000, rng.randrange(20_000, 100_000)
            r.queued_prompt_tokens, r.running = rng.randrange(0, 4096), rng.randrange(0, 8)
    groups = [[rng.randrange(3, 128_000) for _ in range(args.prefix_blocks * bs)] for _ in range(args.groups)]
    hashes = [list(iter_chain_hashes(g, bs)) for g in groups]
    per = args.blocks // (args.replicas + args.decode)
    if per > args.groups * args.prefix_blocks:
        raise SystemExit(f"--blocks {args.blocks} over {args.replicas + args.decode} replicas needs more than "
                         f"--groups x --prefix-blocks = {args.groups * args.prefix_blocks} distinct blocks")
    t0 = time.perf_counter()
    stored = 0
    for ep in pre + dec:
        held: dict[int, int] = {}
        events = [pb.KVEvent(cleared=pb.AllBlocksCleared())]
        n = 0
        while n < per:
            g = rng.randrange(args.groups)
            depth = rng.randrange(1, args.prefix_blocks + 1)
            if held.get(g, 0) >= depth:
                continue
            new = hashes[g][held.get(g, 0):depth][:per - n]
            events.append(pb.KVEvent(stored=pb.BlockStored(block_hashes=new, block_size=bs)))
            held[g] = held.get(g, 0) + len(new)
            n += len(new)
        batch = pb.KVEventBatch(seq=1, worker_id=ep, events=events)
        assert pl.index.apply_batch(ep, batch.seq, batch.events, snapshot=True)
        stored += n
    ingest = stored / (time.perf_counter() - t0)
    return pl, groups, ingest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.router.bench_decision", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=16, help="prefill replicas")
    p.add_argument("--decode", type=int, default=4, help="decode replicas")
    p.add_argument("--blocks", type=int, default=100_000, help="(replica, block) entries cached in all")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--groups", type=int, default=512, help="distinct shared prefixes")
    p.add_argument("--prefix-blocks", type=int, default=128, help="longest shared prefix, in blocks")
    p.add_argument("--prompt-tokens", default="256,1024,2048,8192", help="prompt lengths to measure")
    p.add_argument("--iters", type=int, default=3000, help="decisions per prompt length and kind")
    p.add_argument("--policy", default="cache-aware")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    pl, groups, ingest = build(args, rng)
    bs = args.block_size
    print(f"# {args.replicas} prefill + {args.decode} decode replicas, {sum(pl.index.blocks_of(e) for e in pl.index.slot_of)} "
          f"cached (replica, block) entries, {len(pl.index)} distinct blocks, block size {bs}, policy {args.policy}")
    print(f"# python {platform.python_version()} on {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
          f"event ingest {ingest / 1e6:.2f} M blocks/s")
    print(f"{'prompt':>7} {'kind':>5} {'matched':>8} {'walked':>7} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} "
          f"{'hash p50 us':>11}")
    for n in (int(x) for x in args.prompt_tokens.split(",")):
        for kind in ("hit", "miss"):
            prompts = []
            for _ in range(256):
                if kind == "hit":
                    g = groups[rng.randrange(len(groups))]
                    keep = rng.randrange(1, min(len(g), n) // bs + 1) * bs
                    prompts.append(g[:keep] + [rng.randrange(3, 128_000) for _ in range(n - keep)])
                else:
                    prompts.append([rng.randrange(3, 128_000) for _ in range(n)])
            lat, hlat, matched, walks = [], [], [], []
            for i in range(args.iters):
                t = prompts[i % len(prompts)]
                t0 = time.perf_counter()
                d = pl.choose(t)
                lat.append(time.perf_counter() - t0)
                matched.append(d.matched_tokens)
                # hashing alone, over the blocks the walk needed (the matched run + one)
                walked = min(pl.index.match(t)[1] + 1, n // bs)
                walks.append(walked)
                h0 = time.perf_counter()
                for _ in zip(range(walked), iter_chain_hashes(t, bs)):
                    pass
                hlat.append(time.perf_counter() - h0)
            us = [x * 1e6 for x in lat]
            print(f"{n:>7} {kind:>5} {statistics.mean(matched):>8.0f} {statistics.mean(walks):>7.1f} "
                  f"{_pct(us, 0.5):>8.1f} {_pct(us, 0.99):>8.1f} "
                  f"{statistics.mean(us):>8.1f} {_pct([x * 1e6 for x in hlat], 0.5):>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
