"""`tandem generate`: offline generation from the command line (a quick way to try a model)."""

from __future__ import annotations

import argparse

from tandem.engine.args import add_engine_arguments, engine_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("prompts", nargs="+", help="prompts to complete")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)


def run(args: argparse.Namespace) -> int:
    from tandem.engine.engine import LLM
    from tandem.engine.sampling import SamplingParams

    llm = LLM(config=engine_config_from_args(args))
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    prompts = ([llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in args.prompts]
               if args.chat else args.prompts)
    for prompt, out in zip(args.prompts, llm.generate(prompts, sp)):
        print(f"--- {prompt!r}\n{out.text}\n[{len(out.token_ids)} tokens, finish: {out.finish_reason}]")
    return 0
