"""Model directories in their variants, and the errors the engine gives for bad models and bad
requests (while it keeps serving the good ones)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tandem.engine import (LLM, InvalidRequestError, ModelConfig, ModelLoadError, SamplingParams,
                           UnsupportedArchitectureError)
from tandem.engine.make_model import make_test_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9] * 7, [100, 200, 300]]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, dtype="float32", max_model_len=64)


def test_prompt_too_long_is_rejected_and_engine_keeps_serving(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1] * 64], GREEDY)
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"
    assert "64 tokens" in str(e.value)
    # Nothing was queued, and the next request runs normally.
    assert not llm.engine.has_unfinished()
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 6


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 99}, "logprobs"), ({"stop_token_ids": [10 ** 9]}, "stop_token_ids"),
    ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
])
def test_bad_sampling_params(llm, kw, param):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1, 2, 3]], SamplingParams(**kw))
    assert e.value.param == param and param in str(e.value)


def test_bad_prompt_tokens(llm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 10 ** 7]], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.engine.add_request("empty", [], GREEDY)


def test_unsupported_architecture(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as e:
        LLM(str(d))
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM"):
        assert name in str(e.value)


def test_missing_and_corrupt_weights(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(d))
    weights.write_bytes(data[: len(data) // 2])          # truncated file
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(d))
    weights.write_bytes(b"\x00" * 64)                      # garbage header
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(d))


def test_missing_tensor_is_named(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.down_proj.weight"):
        LLM(str(d))


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))


def test_sharded_checkpoint_equals_single_file(tmp_path, tiny_llama):
    sharded = make_test_model(tmp_path / "sharded", "llama", shard_mb=1)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a = LLM(tiny_llama, dtype="float32").generate(PROMPTS, GREEDY)
    b = LLM(str(sharded), dtype="float32").generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_legacy_and_new_rope_spellings_agree(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    new = make_test_model(tmp_path / "new", "llama", rope=rope, weights=False)
    old = make_test_model(tmp_path / "old", "llama", rope=rope, weights=False, legacy_rope=True)
    assert "rope_parameters" in json.loads((new / "config.json").read_text())
    assert "rope_scaling" in json.loads((old / "config.json").read_text())
    assert ModelConfig.from_dir(new) == ModelConfig.from_dir(old)
    assert ModelConfig.from_dir(new).rope.type == "llama3"


def test_dtype_from_config_and_override(tiny_llama):
    assert ModelConfig.from_dir(tiny_llama).dtype == torch.float32
    assert ModelConfig.from_dir(tiny_llama, "bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        ModelConfig.from_dir(tiny_llama, "int3")


def test_eos_ids_list_from_generation_config(tiny_llama):
    gen = json.loads(open(f"{tiny_llama}/generation_config.json").read())
    assert isinstance(gen["eos_token_id"], list) and len(gen["eos_token_id"]) == 2
    assert set(ModelConfig.from_dir(tiny_llama).eos_token_ids) == set(gen["eos_token_id"])
