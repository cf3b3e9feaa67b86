"""`tandem make-test-model`: writes a Hugging Face model directory with random weights and a real
byte-level BPE tokenizer trained (with `tokenizers`) on built-in text, plus a chat template.

The result loads through exactly the code that loads a real checkpoint, and transformers loads it
too, which is what the correctness tests compare against. Presets keep head_dim 128, the shape the
prebuilt GPU attention kernels are compiled for.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# Varied text for the tokenizer: prose, code, numbers, punctuation and some non-ASCII, so the
# trained merges look like a real tokenizer's and UTF-8 edge cases occur in tests.
CORPUS = """\
Tandem serves large language models with disaggregated prefill and decode. A prefill pool
computes the key-value cache of each prompt and writes it into the memory of a decode replica,
which then generates the answer one token at a time. The router sends every request to the
replica that already holds the longest matching prefix of its tokens, balanced against load.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; the five boxing wizards jump quickly.
def forward(self, input_ids, positions, kv_cache):
    hidden = self.embed(input_ids)
    for layer in self.layers:
        hidden = layer(hidden, positions, kv_cache)
    return self.norm(hidden)
SELECT name, count(*) FROM requests WHERE latency_ms < 250 GROUP BY name ORDER BY 2 DESC;
{"model": "llama3-8b", "prompt": "Hello, world", "max_tokens": 128, "temperature": 0.7}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 3.14159 2.71828 1e-6
Once upon a time, in a data center far away, thousands of graphics processors hummed along,
answering questions about recipes, mathematics, history, poetry and the weather.
Café, naïve, façade, jalapeño, Zürich, São Paulo, Kraków; 東京, 北京, 서울; emoji: 🚀✨🙂.
Paged attention splits the cache into fixed-size blocks, so memory is never fragmented, and
requests that share a system prompt share its blocks through a hash of their token ids.
Continuous batching admits new requests at every step instead of waiting for a batch to drain.
Q: What is the capital of France? A: Paris. Q: What is 12 times 12? A: 144.
The mitochondria is the powerhouse of the cell; photosynthesis turns light into sugar.
In 1969, humans first walked on the Moon; in 1989, the World Wide Web was proposed.
"""


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 128
    max_positions: int = 4096
    dtype: str = "float32"


PRESETS = {
    "tiny": Shape(layers=2, hidden=256, heads=2, kv_heads=1, intermediate=512, vocab=1024),
    "small": Shape(layers=4, hidden=512, heads=4, kv_heads=2, intermediate=1024, vocab=2048),
    "llama-3.1-8b": Shape(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                          vocab=128256, max_positions=131072, dtype="bfloat16"),
}
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# The pre-tokenization regexes of the real tokenizers (Llama 3 groups up to 3 digits, Qwen2 splits
# every digit), so that transformers' model-specific tokenizer classes agree with tokenizer.json.
SPLIT_PATTERNS = {
    "llama": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def train_tokenizer(vocab_size: int, specials: list[str], bos: str | None, family: str = "llama"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERNS[family]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def pad_vocab(tok, vocab: int):
    """Give every id below ``vocab`` a token, so that whatever id a random model samples decodes
    to text. The trained BPE stops at a few thousand tokens, while e.g. the Llama-3.1 shape has
    128,256 ids: without this, almost every generated token decodes to nothing, no text streams
    until the end, and serving benchmarks measure nonsense. The fillers (" ~" + base-36 id in the
    byte-level alphabet) are never produced by encoding (no merge leads to them)."""
    from tokenizers import Tokenizer
    n = tok.get_vocab_size(with_added_tokens=True)
    if n >= vocab:
        return tok
    data = json.loads(tok.to_str())
    table = data["model"]["vocab"]
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"

    def b36(i: int) -> str:
        out = ""
        while True:
            i, r = divmod(i, 36)
            out = digits[r] + out
            if not i:
                return out

    for i in range(n, vocab):
        table["\u0120~" + b36(i)] = i        # U+0120 is the byte-level alphabet's space
    return Tokenizer.from_str(json.dumps(data))


def make_test_model(out: str | Path, arch: str = "llama", preset: str = "tiny", weights: bool = True,
                    shard_mb: int = 0, seed: int = 0, std: float | None = None, legacy_rope: bool = False,
                    rope: dict | None = None, **overrides) -> Path:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    shape = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llama = arch == "llama"
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>"] if llama else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = train_tokenizer(min(shape.vocab, 4096), specials, "<|begin_of_text|>" if llama else None,
                          "llama" if llama else "qwen")
    vocab = max(shape.vocab, tok.get_vocab_size())
    tok = pad_vocab(tok, vocab)
    tok.save(str(out / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in specials}
    bos = ids.get("<|begin_of_text|>")
    eos_tok = "<|eot_id|>" if llama else "<|im_end|>"
    eos = [ids[eos_tok], ids["<|end_of_text|>" if llama else "<|endoftext|>"]]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>" if llama else None,
        "eos_token": eos_tok,
        "pad_token": eos_tok,
        "model_max_length": shape.max_positions,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out / "chat_template.jinja").write_text(LLAMA_TEMPLATE if llama else CHATML_TEMPLATE)
    config = {
        "architectures": [ARCHS[arch]],
        "model_type": {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[arch],
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-5 if llama else 1e-6,
        "tie_word_embeddings": not llama,
        "attention_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos[0],
        "dtype": shape.dtype,
    }
    rope_override = rope
    rope = {"rope_type": "default", "rope_theta": 500000.0 if llama else 1000000.0}
    if rope_override:
        rope = dict(rope_override)
    elif preset == "llama-3.1-8b":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if legacy_rope:  # transformers 4 spelling
        config["rope_theta"] = rope.pop("rope_theta")
        config["torch_dtype"] = config.pop("dtype")
        if rope["rope_type"] != "default":
            config["rope_scaling"] = rope
    else:
        config["rope_parameters"] = rope
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2))
    if weights:
        # Small models get large weights on purpose: with attention scores of order 1, a wrong
        # position, mask or cached block changes the output instead of averaging away.
        std = std if std is not None else (0.02 if shape.hidden >= 2048 else 0.1)
        write_random_weights(out, config, shard_mb, seed, std)
    return out


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d, nh, kvh = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    arch = config["architectures"][0]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for l in range(config["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * d, h), p + "self_attn.k_proj.weight": (kvh * d, h),
            p + "self_attn.v_proj.weight": (kvh * d, h), p + "self_attn.o_proj.weight": (h, nh * d),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i)})
        if arch == "Qwen2ForCausalLM":
            shapes.update({p + "self_attn.q_proj.bias": (nh * d,), p + "self_attn.k_proj.bias": (kvh * d,),
                           p + "self_attn.v_proj.bias": (kvh * d,)})
        if arch == "Qwen3ForCausalLM":
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def write_random_weights(out: Path, config: dict, shard_mb: int, seed: int, std: float) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config["dtype"] if "dtype" in config else config["torch_dtype"]]
    tensors = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            # Norm weights near 1 but not exactly, so a wrongly skipped norm changes outputs.
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        tensors[name] = t.to(dtype)
    if not shard_mb:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_mb << 20:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to write (created if missing)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="shape preset; tiny runs CPU tests fast, llama-3.1-8b has the real shapes")
    for flag, dest in (("--layers", "layers"), ("--hidden", "hidden"), ("--heads", "heads"),
                       ("--kv-heads", "kv_heads"), ("--vocab", "vocab"),
                       ("--intermediate", "intermediate"), ("--head-dim", "head_dim"),
                       ("--max-positions", "max_positions")):
        p.add_argument(flag, dest=dest, type=int, default=None, help=f"override the preset's {dest}")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--no-weights", action="store_true",
                   help="write config and tokenizer only; run with --load-format random "
                        "(weights drawn on the GPU, nothing large on disk)")
    p.add_argument("--shard-mb", type=int, default=0, help="split weights into shards of this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=None,
                   help="std of the random weight matrices (default 0.1 for small presets, 0.02 else)")


def run(args: argparse.Namespace) -> int:
    shape_over = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "vocab",
                                                "intermediate", "head_dim", "max_positions", "dtype")}
    n_bytes = _estimate_bytes(args.preset, shape_over)
    if not args.no_weights and n_bytes > 4 << 30:
        print(f"[tandem] writing ~{n_bytes / 2**30:.1f} GiB of random weights "
              f"(use --no-weights with --load-format random to skip)")
    out = make_test_model(args.out, args.arch, args.preset, weights=not args.no_weights,
                          shard_mb=args.shard_mb, seed=args.seed, std=args.std, **shape_over)
    print(f"[tandem] wrote {args.arch} ({args.preset}) test model to {out}")
    return 0


def _estimate_bytes(preset: str, over: dict) -> int:
    s = replace(PRESETS[preset], **{k: v for k, v in over.items() if v is not None})
    per = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads) + 3 * s.hidden * s.intermediate
    item = 4 if s.dtype == "float32" else 2
    return (per * s.layers + 2 * s.vocab * s.hidden) * item if not math.isnan(per) else 0
