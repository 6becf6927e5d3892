"""Tokenizers: a byte-level BPE trained on the corpus (EN + ZH) for from-scratch presets, and the
special tokens ECHO needs on top of a real Qwen2.5-VL tokenizer (a mask token)."""

from __future__ import annotations

from collections.abc import Iterable

from echocxr.model.vlm import SpecialIds

# Qwen2.5-VL's chat and vision special tokens, plus the diffusion mask token.
PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
MASK = "<|mask|>"
SPECIAL_TOKENS = [PAD, IM_START, EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, MASK]


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE on report texts; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        additional_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
    )


def ensure_mask_token(tokenizer) -> bool:
    """Add <|mask|> where the tokenizer lacks one (real Qwen2.5-VL tokenizers). Returns True if added."""
    if tokenizer.mask_token is not None and tokenizer.convert_tokens_to_ids(tokenizer.mask_token) is not None:
        return False
    tokenizer.add_special_tokens({"mask_token": MASK})
    return True


def special_ids(tokenizer) -> SpecialIds:
    def tid(t: str) -> int:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer lacks the special token {t}")
        return i

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tid(PAD)
    return SpecialIds(
        eos=tid(EOS),
        pad=pad,
        mask=tid(tokenizer.mask_token or MASK),
        image=tid(IMAGE_PAD),
        vision_start=tid(VISION_START),
        vision_end=tid(VISION_END),
    )
