"""Builders shared by the model and decoder tests (imported as `helpers`: pytest puts tests/ on
sys.path). Plain functions, no fixtures: each test module keeps its own fixture scope."""

from __future__ import annotations

import contextlib

import torch

# A small bilingual corpus: enough for a BPE tokenizer and a few reports to decode or train on.
REPORTS = [
    "Findings: The heart is normal in size. No pleural effusion. No pneumothorax.\nImpression: Normal chest.",
    "Findings: Mild cardiomegaly. Small left pleural effusion.\nImpression: Cardiomegaly with effusion.",
    "所见：心影大小正常。无胸腔积液。无气胸。\n印象：胸部未见异常。",
] * 20


@torch.no_grad()
def widen(model, std: float = 0.3, seed: int = 0):
    """Redraw every matrix of `model.hf` from N(0, std^2) (seeded) and return the model. At the
    default init (std 0.02) a tiny random model emits one position-driven pattern whatever its
    input; a wider init makes its tokens depend on the image and on the text so far."""
    g = torch.Generator().manual_seed(seed)
    for p in model.hf.parameters():
        if p.dim() == 2:
            p.normal_(0, std, generator=g)
    return model


def prefer_banned(model):
    """Make `model.logits` favour the mask token most, then pad, the image token and vision start
    (an instance attribute: only this model), so a decoder without the guard emits them (the
    reproduction of issue #14 item 6). Returns the model."""
    s = model.special
    bias = torch.zeros(model.vocab_size)
    bias[s.mask], bias[s.pad], bias[s.image], bias[s.vision_start] = 60.0, 50.0, 40.0, 30.0
    plain = model.logits
    model.logits = lambda h: plain(h) + bias.to(h.dtype)
    return model


def noise_image(rng, side: int = 64):
    """A side x side grayscale PIL image of uniform noise from numpy Generator `rng` (a stand-in
    radiograph: the processor resizes it to the preset's input)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8))


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port) for client tests, used as a context manager.
    Every POST's JSON body goes to `answer(path, headers, body) -> (status, reply)`; `reply` is
    sent back as JSON. `.url` is its base address."""

    def __init__(self, answer):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = answer(self.path, self.headers, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def killed_after_first_checkpoint(monkeypatch):
    """Inside the block, the training loop raises KeyboardInterrupt (as a kill would) right after it
    writes its first checkpoint; the real `save_checkpoint` is back on leaving the block."""
    from echocxr.train import loop

    real_save = loop.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", save_then_die)
        yield
