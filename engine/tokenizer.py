"""Tokenizer, chat template and incremental detokenizer for a Hugging Face model directory.

Text -> ids goes through ``tokenizer.json`` (the `tokenizers` library, so its post-processor adds
BOS exactly as transformers would). Chat messages are rendered with the model's Jinja chat
template (``chat_template.jinja`` or ``tokenizer_config.json``) and encoded without adding special
tokens again, as ``apply_chat_template(tokenize=True)`` does. Ids -> text while streaming uses
`IncrementalDetokenizer`, which never emits half a UTF-8 character.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tandem.engine.errors import InvalidRequestError, ModelLoadError


def _token_text(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content") if isinstance(tok, dict) else None


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error text is informative enough
            raise ModelLoadError(f"{path}: cannot load tokenizer: {e}") from e
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif isinstance(cfg.get("chat_template"), str):
            template = cfg["chat_template"]
        elif isinstance(cfg.get("chat_template"), list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in cfg["chat_template"]}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template = template
        self._compiled = None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.special_ids = {i for t, i in self._tok.get_vocab(with_added_tokens=True).items()
                            if t in self._special_strings()}

    def _special_strings(self) -> set[str]:
        return {a.content for a in self._tok.get_added_tokens_decoder().values() if a.special}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, **kwargs) -> str:
        if not self.chat_template:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions", param="messages")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            self._compiled = env.from_string(self.chat_template)
        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template failed: {e}", param="messages") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kw) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kw),
                           add_special_tokens=False)


def _raise_template_error(msg: str):
    raise jinja2.TemplateError(msg)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE tokens can end inside a UTF-8 character, and some tokenizers change earlier
    text depending on later tokens. Decoding a short window (`prefix_offset`..end) and comparing
    with the window without the new tokens (`prefix_offset`..`read_offset`) yields only settled
    text; a trailing U+FFFD means "wait for the next token".
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids) -> str:
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is left at the end of the stream, even an incomplete character."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.read_offset = self.prefix_offset = len(self.ids)
        self.text += delta
        return delta
