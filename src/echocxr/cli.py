"""The `echocxr` command line: one subcommand per user task.

Each subcommand lives in the module that does the work; that module defines
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
command runs, so `echocxr --help` stays fast and import has no side effects.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from echocxr.errors import UserError

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "build"): (
        "echocxr.data.build",
        "read report corpora and write the normalized bilingual corpus",
    ),
    ("data", "phantoms"): ("echocxr.data.phantom", "render phantom radiographs to PNG for inspection"),
    ("data", "validate-labeler"): (
        "echocxr.data.labeler_validate",
        "score the labeler against IU MeSH codes",
    ),
    ("train",): ("echocxr.train.cli", "train a stage: --stage ar | rad | dcd"),
    ("generate",): ("echocxr.decode.cli", "write reports for images with a trained checkpoint"),
    ("eval",): ("echocxr.eval.evaluate", "score a decoder on the held-out set"),
    ("eval", "commits"): (
        "echocxr.eval.commits",
        "per denoising step: what the block decoder commits and how image-dependent it is",
    ),
    ("bench", "decode"): ("echocxr.bench.decode", "decode speed of every decoder (JSON line)"),
    ("bench", "rad"): ("echocxr.bench.rad_flops", "RAD vs symmetric duplication: FLOPs and step time"),
    ("bench", "phantoms"): ("echocxr.bench.phantoms", "phantom learnability (AUROC) and render speed"),
    ("bench", "vision-head"): (
        "echocxr.bench.vision_head",
        "per-finding AUROC of a Stage 0 tower + head on the eval phantoms (JSON line)",
    ),
    ("bench", "serve"): (
        "echocxr.bench.serve",
        "server throughput and latency, batching on and off (JSON lines)",
    ),
    ("bench", "generate"): (
        "echocxr.bench.generate",
        "archive throughput: 1 process vs torchrun ranks, merge share, 100k-study estimate (JSON line)",
    ),
    ("bench", "rehearse"): (
        "echocxr.bench.rehearse",
        "a user's 7B run end to end with random weights: build, load, logits, speed, LoRA steps, serve",
    ),
    ("serve",): ("echocxr.serve.cli", "serve reports over HTTP: OpenAI-compatible API, web page, batching"),
    ("run",): ("echocxr.pipeline", "the whole chain for a preset: corpus -> AR -> RAD -> DCD -> eval"),
    ("demo",): ("echocxr.pipeline", "end-to-end demo on CPU with the tiny preset"),
}


def _usage() -> str:
    lines = ["usage: echocxr COMMAND [options]", "", "commands:"]
    for words, (_, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<24} {help_}")
    lines.append("")
    lines.append("Run `echocxr COMMAND --help` for the options of one command.")
    return "\n".join(lines)


def _match(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            return key, argv[n:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from echocxr import __version__

        print(__version__)
        return 0
    found = _match(argv)
    if found is None:
        print(f"echocxr: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    words, rest = found
    module_name, help_ = COMMANDS[words]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog="echocxr " + " ".join(words), description=help_)
    if words == ("demo",) and hasattr(module, "add_demo_arguments"):
        module.add_demo_arguments(parser)
        runner = module.run_demo
    else:
        module.add_arguments(parser)
        runner = module.run
    args = parser.parse_args(rest)
    try:
        return int(runner(args) or 0)
    except UserError as e:
        print(f"echocxr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echocxr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
