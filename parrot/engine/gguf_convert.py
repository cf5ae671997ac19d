"""Convert a GGUF file once into a Hugging Face directory (bf16 safetensors).

Dequantizing GGUF and building its tokenizer takes many seconds; a converted
directory loads in well under one. The directory lives in the cache, keyed by the
GGUF file's content hash, so a changed file never reuses a stale conversion.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from parrot.errors import ModelNotFoundError

log = logging.getLogger(__name__)

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    prefix, layer, part, kind = gguf_name.split(".")
    if prefix != "blk" or part not in _LAYER_TENSORS:
        raise ModelNotFoundError(f"unexpected tensor {gguf_name!r} in GGUF file")
    return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows so HF's rotate-half RoPE applies."""
    # w: [n_heads * head_dim, ...] laid out per head as (head_dim/2, 2) pairs
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _config_from_metadata(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelNotFoundError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", vocab)),
        "hidden_size": int(hidden),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": int(n_heads),
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", hidden // n_heads)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": not has_output,
        "attention_bias": arch == "qwen2",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "bfloat16",
    }


def _write_tokenizer(gguf_path: Path, out_dir: Path, chat_template: str | None) -> None:
    # transformers knows how to rebuild a fast tokenizer from GGUF metadata
    # (vocabulary, merges, pre-tokenizer); we only need its tokenizer.json once.
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelNotFoundError(
            "converting a GGUF file needs transformers once: pip install 'parrot-serve[convert]'"
        ) from exc
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if chat_template and not cfg.get("chat_template"):
        cfg["chat_template"] = chat_template
        cfg_path.write_text(json.dumps(cfg, indent=2))


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors (bf16) and tokenizer files into out_dir."""
    import gguf

    from rich.progress import track

    reader = gguf.GGUFReader(str(gguf_path))
    config = _config_from_metadata(reader)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        for tensor in track(reader.tensors, description=f"Converting {gguf_path.name}", transient=True):
            # dequantize returns float32 shaped [rows, cols] in PyTorch's (out, in) order
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            short = tensor.name.split(".")[-2] if tensor.name.startswith("blk.") else ""
            if config["model_type"] == "llama" and short in ("attn_q", "attn_k"):
                heads = config["num_attention_heads"] if short == "attn_q" else config["num_key_value_heads"]
                weights = _unpermute_rope(weights, heads)
            tensors[_hf_name(tensor.name)] = torch.from_numpy(np.array(weights, dtype=np.float32)).to(torch.bfloat16)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(gguf_path, tmp, _field(reader, "tokenizer.chat_template"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
