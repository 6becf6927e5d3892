"""The chat prompt: image(s) plus the paper's instruction; the target is the normalized report."""

from __future__ import annotations

from echocxr.model.tokenizer import EOS, IM_START, IMAGE_PAD, VISION_END, VISION_START

INSTRUCTION = {
    "en": "Review this chest X-ray and write a report. Use this format: Findings: {}, Impression: {}.",
    "zh": "请查看这张胸部X光片并撰写报告。请使用以下格式：所见：{}，印象：{}。",
}
SYSTEM = "You are a helpful assistant."


def prompt_text(n_images: int, tokens_per_image: int, language: str = "en") -> str:
    vision = (VISION_START + IMAGE_PAD * tokens_per_image + VISION_END) * n_images
    return (
        f"{IM_START}system\n{SYSTEM}{EOS}\n"
        f"{IM_START}user\n{vision}{INSTRUCTION[language]}{EOS}\n"
        f"{IM_START}assistant\n"
    )


def prompt_ids(tokenizer, n_images: int, tokens_per_image: int, language: str = "en") -> list[int]:
    return tokenizer.encode(prompt_text(n_images, tokens_per_image, language), add_special_tokens=False)


def response_ids(tokenizer, report: str) -> list[int]:
    """The target: report tokens followed by <|im_end|> (the end-of-sequence the model must learn)."""
    return tokenizer.encode(report, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(EOS)]
