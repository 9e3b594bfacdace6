"""A GGUF file beside the export, for llama.cpp and the runtimes built on it (Ollama, LM Studio, llama-cpp-python).

Written from the exported safetensors folder one tensor at a time (the tensor table first, from the shards'
headers; then each tensor converted and appended), so it holds one tensor at a time like the export itself.
What llama.cpp's own converter (convert_hf_to_gguf.py) writes for these families, reduced to them:
- gpt2: GPT-2's `Conv1D` weights transposed to (out, in); the output layer is the token embedding (tied);
- llama (and `hf` models of type llama): the query and key projections permuted from Hugging Face's rotary
  layout (halves) to llama.cpp's (interleaved pairs); Llama 3's RoPE scaling as `rope_freqs.weight`;
- the tokenizer as llama.cpp's byte-level BPE (`gpt2` model, `gpt-2` pre-tokenizer: what `llm-train prepare`
  trains), its merges, the end/start/pad ids and the chat template.
Types: f16 (every matrix in half precision) or q8_0 (8-bit blocks of 32 for matrices whose rows divide into
them, f16 for the others); vectors (norms, biases) stay f32, as llama.cpp expects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import UserError

GGUF_TYPES = ("f16", "q8_0")
GGUF_FAMILIES = ("gpt2", "llama")
"""Model types written here: those llama.cpp runs that llm-train trains (other `hf` types: export without --gguf
and use llama.cpp's convert_hf_to_gguf.py, which knows many more)."""
GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def check_gguf_request(kind: str, model_type: str) -> None:
    """One line, before anything is written, when the GGUF file cannot be made."""
    if kind not in GGUF_TYPES:
        raise UserError(f"--gguf {kind!r} is not one of {', '.join(GGUF_TYPES)}")
    if model_type not in GGUF_FAMILIES:
        raise UserError(
            f"--gguf: llama.cpp files are written for {' and '.join(GGUF_FAMILIES)} models; this is a '{model_type}' "
            "model: export without --gguf (llama.cpp's convert_hf_to_gguf.py converts many more types)"
        )


def write_gguf(folder: Path, kind: str) -> Path:
    """`folder/model-<kind>.gguf` from the exported folder (config.json, safetensors, tokenizer)."""
    import gguf
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    check_gguf_request(kind, config["model_type"])
    arch = gguf.MODEL_ARCH.GPT2 if config["model_type"] == "gpt2" else gguf.MODEL_ARCH.LLAMA
    layers = config.get("n_layer") or config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, layers)
    path = folder / f"model-{kind}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_metadata(writer, config, kind)
    _write_tokenizer(writer, folder, config)
    files = {
        file: [] for file in sorted(folder.glob("*.safetensors"))
    }  # file -> its tensors, in the table's order
    for file, tensors in files.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                shape, dtype, raw_dtype, nbytes = _stored_form(
                    config, name, handle.get_slice(name).get_shape(), kind
                )
                writer.add_tensor_info(_gguf_name(names, name), shape, dtype, nbytes, raw_dtype=raw_dtype)
                tensors.append(name)
    factors = llama3_rope_factors(config)
    if factors is not None:  # Llama 3's RoPE scaling, which llama.cpp takes as a tensor of frequency factors
        writer.add_tensor_info("rope_freqs.weight", list(factors.shape), np.dtype(np.float32), factors.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for file, tensors in files.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in tensors:
                writer.write_tensor_data(_stored(config, name, kind, handle.get_tensor(name)))
    if factors is not None:
        writer.write_tensor_data(factors)
    writer.close()
    return path


def _write_metadata(writer: Any, config: dict[str, Any], kind: str) -> None:
    import gguf

    writer.add_name(config.get("_name_or_path") or config["model_type"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config["model_type"] == "gpt2":
        width = config["n_embd"]
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(width)
        writer.add_feed_forward_length(config.get("n_inner") or 4 * width)
        writer.add_block_count(config["n_layer"])
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        return
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """The per-frequency divisors of Llama 3's RoPE scaling (`rope_type: llama3`), as llama.cpp's converter writes
    them (`rope_freqs.weight`); None for a model without it."""
    scaling = config.get("rope_scaling") or {}
    if config["model_type"] != "llama" or (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return None
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    base = config.get("rope_theta", 10000.0)
    factor, low, high = (
        scaling.get("factor", 8.0),
        scaling.get("low_freq_factor", 1.0),
        scaling.get("high_freq_factor", 4.0),
    )
    original = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for frequency in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _write_tokenizer(writer: Any, folder: Path, config: dict[str, Any]) -> None:
    """The tokenizer as llama.cpp's byte-level BPE, every id of the model's vocabulary named."""
    import gguf

    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"--gguf: {folder} has no tokenizer.json; llama.cpp needs the tokenizer in the file")
    tokenizer = json.loads(tokenizer_file.read_text())
    model = tokenizer["model"]
    if model.get("type") != "BPE" or (tokenizer.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise UserError(
            "--gguf: the tokenizer is not a byte-level BPE (the kind `llm-train prepare` trains); export without "
            "--gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab_size = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in tokenizer.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = (
                gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
            )
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):  # fmt: skip
        if isinstance(config.get(key), int):
            add(config[key])
    settings = folder / "tokenizer_config.json"
    template = json.loads(settings.read_text()).get("chat_template") if settings.is_file() else None
    if isinstance(template, str):
        writer.add_chat_template(template)


def _gguf_name(names: Any, name: str) -> str:
    base, _, suffix = name.rpartition(".")
    target = names.get_name(base)
    if target is None:
        raise UserError(f"--gguf: no llama.cpp name for the tensor {name}; export without --gguf")
    return f"{target}.{suffix}"


def _transposed(config: dict[str, Any], name: str) -> bool:
    """GPT-2's Conv1D weights, stored (in, out), which llama.cpp reads (out, in)."""
    return config["model_type"] == "gpt2" and name.endswith(GPT2_TRANSPOSED)


def _quantized(kind: str, shape: list[int] | tuple[int, ...]) -> bool:
    """A matrix whose rows divide into q8_0's blocks of 32 (the others stay f16, vectors f32)."""
    return kind == "q8_0" and len(shape) >= 2 and shape[-1] % 32 == 0


def _stored(config: dict[str, Any], name: str, kind: str, tensor: torch.Tensor) -> np.ndarray:
    """The tensor as the file stores it: laid out as llama.cpp reads it, in the file's type."""
    import gguf

    tensor = tensor.float()
    if _transposed(config, name):
        tensor = tensor.T.contiguous()
    elif config["model_type"] == "llama" and name.endswith(
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
    ):
        heads = config["num_attention_heads"]
        if name.endswith("k_proj.weight"):
            heads = config.get("num_key_value_heads") or heads
        tensor = _rotary_pairs(tensor, heads)
    data = tensor.numpy()
    if data.ndim < 2:
        return data.astype(np.float32)
    if _quantized(kind, data.shape):
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
    return data.astype(np.float16)


def _stored_form(
    config: dict[str, Any], name: str, shape: list[int], kind: str
) -> tuple[list[int], Any, Any, int]:
    """(shape, numpy dtype, quantized type or None, bytes) of the tensor as the file stores it, from its shape
    alone, in the form GGUFWriter's tensor table takes (a quantized tensor's shape in bytes)."""
    import gguf

    laid_out = list(shape[::-1]) if _transposed(config, name) else list(shape)
    if len(laid_out) < 2:
        return laid_out, np.dtype(np.float32), None, math.prod(laid_out) * 4
    if _quantized(kind, laid_out):
        byte_shape = list(gguf.quants.quant_shape_to_byte_shape(laid_out, gguf.GGMLQuantizationType.Q8_0))
        return byte_shape, np.dtype(np.uint8), gguf.GGMLQuantizationType.Q8_0, math.prod(byte_shape)
    return laid_out, np.dtype(np.float16), None, math.prod(laid_out) * 2


def _rotary_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary layout (each head's first half, then its second) to llama.cpp's (pairs)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
