"""A Qwen2.5-VL checkpoint folder with random weights, laid out as a user's download (Lingshu-7B).

- config.json and generation_config.json of `Qwen2_5_VLForConditionalGeneration` (from our
  `EchoVLM.from_config`, built on the meta device: no memory);
- sharded safetensors under the original Qwen2.5-VL names (`model.layers.*`, `visual.*`,
  `lm_head.*`) with model.safetensors.index.json. Each tensor is filled in the target dtype and
  written straight to its shard, so at most one tensor is held in memory (the embedding, 1.1 GB
  at the 7B shape);
- a byte-level BPE tokenizer with Qwen2.5-VL's special tokens at their real ids (151643 ...
  151664, 151665 tokens in all): regular ids 0..151642 are a BPE fitted on a few report sentences,
  padded with byte strings no merge produces; no download;
- preprocessor_config.json: Qwen2.5-VL's image processor with min_pixels = max_pixels =
  image_size^2 (what a user sets to choose the input side; the loader honours it).
Initialisation as transformers': matrices ~ N(0, 0.02^2) (here uniform with that std: 2x faster to
draw), norm weights 1, biases 0.
"""

from __future__ import annotations

import copy
import json
import struct
import threading
import time
from pathlib import Path

import torch

QWEN_REGULAR_TOKENS = 151643  # ids 0..151642 are byte-level BPE tokens in Qwen2 / Qwen2.5(-VL)
QWEN_SPECIAL_TOKENS = [  # ids 151643.. in this order
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# transformers' current module names -> the names Qwen2.5-VL checkpoints on disk use
DISK_NAMES = (("model.visual.", "visual."), ("model.language_model.", "model."))
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def qwen_tokenizer(texts: list[str]):
    """A PreTrainedTokenizerFast with Qwen2.5-VL's pre-tokenizer, ids and vocabulary size."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    fit = Tokenizer(models.BPE())
    fit.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=alphabet, show_progress=False)
    fit.train_from_iterator(texts, trainer=trainer)
    model = json.loads(fit.to_str())["model"]
    vocab, merges = dict(model["vocab"]), model["merges"]
    chars = sorted(alphabet)
    i = 0
    while len(vocab) < QWEN_REGULAR_TOKENS:  # 3-byte strings: decodable, never produced by a merge
        filler = chars[i // 65536 % 256] + chars[i // 256 % 256] + chars[i % 256]
        i += 1
        if filler not in vocab:
            vocab[filler] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


def _fill(t: torch.Tensor, kind: str, seed: int) -> None:
    """In place, in t's dtype: "norm" -> 1, "bias" -> 0, else uniform with std 0.02 (two threads)."""
    if kind == "norm":
        t.fill_(1.0)
        return
    if kind == "bias":
        t.zero_()
        return
    flat, a = t.view(-1), 0.02 * 3**0.5
    parts = flat.chunk(2)

    def draw(j: int) -> None:
        parts[j].uniform_(-a, a, generator=torch.Generator().manual_seed(seed * 2 + j))

    threads = [threading.Thread(target=draw, args=(j,)) for j in range(len(parts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _write_shard(path: Path, entries: list[tuple[str, tuple, str, int]], dtype, seed: int) -> None:
    """safetensors file: 8-byte header length, JSON header, then each tensor's bytes in order."""
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _, _ in entries:
        n = size * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for _, shape, kind, k in entries:
            t = torch.empty(shape, dtype=dtype)
            _fill(t, kind, seed * 100_003 + k)
            f.write(memoryview(t.view(torch.uint8).numpy()))
            del t


def write_random_checkpoint(
    out: Path, cfg, *, dtype=torch.bfloat16, seed: int = 0, shard_bytes: int = 5 * 2**30, texts=None
) -> dict:
    """Write the folder (module docstring) for ModelConfig `cfg`; returns sizes and seconds."""
    from echocxr.bench.decode import SMOKE_TEXTS
    from echocxr.model.image_processing import make_image_processor
    from echocxr.model.prompt import INSTRUCTION, SYSTEM
    from echocxr.model.tokenizer import ensure_mask_token
    from echocxr.model.vlm import EchoVLM

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer(list(texts or SMOKE_TEXTS) + list(INSTRUCTION.values()) + [SYSTEM])
    tok.save_pretrained(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"  # as Qwen2.5-VL / Lingshu folders name it
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    t_tok = time.perf_counter() - t0
    with_mask = copy.deepcopy(tok)  # from_config wants every id it uses; the saved one has no mask
    ensure_mask_token(with_mask)
    with torch.device("meta"):
        hf = EchoVLM.from_config(cfg, with_mask, dtype=dtype).hf
    hf.config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    hf.config.save_pretrained(out)
    hf.generation_config.save_pretrained(out)
    norms = {n for n, m in hf.named_modules() if "Norm" in type(m).__name__}
    entries = []
    for k, (name, p) in enumerate(hf.state_dict().items()):
        module, _, leaf = name.rpartition(".")
        kind = "bias" if leaf == "bias" else "norm" if module in norms else "matrix"
        for new, old in DISK_NAMES:
            if name.startswith(new):
                name = old + name[len(new) :]
                break
        entries.append((name, tuple(p.shape), kind, k))
    size = torch.empty((), dtype=dtype).element_size()
    shards, cur, cur_bytes = [], [], 0
    for e in entries:
        n = size * int(torch.Size(e[1]).numel())
        if cur and cur_bytes + n > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(e)
        cur_bytes += n
    shards.append(cur)
    t1 = time.perf_counter()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / file, shard, dtype, seed)
        for name, shape, _, _ in shard:
            weight_map[name] = file
            total += size * int(torch.Size(shape).numel())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    t_weights = time.perf_counter() - t1
    proc = make_image_processor(cfg.image_size)
    proc.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre.update(
        min_pixels=cfg.image_size**2, max_pixels=cfg.image_size**2, processor_class="Qwen2_5_VLProcessor"
    )
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return {
        "params_b": round(sum(int(torch.Size(e[1]).numel()) for e in entries) / 1e9, 3),
        "bytes": total,
        "shards": len(shards),
        "tokenizer_len": len(tok),
        "tokenizer_s": round(t_tok, 2),
        "weights_fill_write_s": round(t_weights, 2),
        "write_gb_per_s": round(total / 1e9 / max(t_weights, 1e-9), 3),
        "seconds": round(time.perf_counter() - t0, 2),
    }
