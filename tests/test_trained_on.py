"""The checkpoint metadata's `trained_on` (issue #16): counted from the positions the training
stream fed, carried forward stage to stage, and shown by the server."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from echocxr.data.records import ImageRef, Record, write_jsonl
from echocxr.train.data import StudyStream, image_provenance


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """5 train records; records 0 and 3 have a real (all-white) PNG, the others none."""
    d = tmp_path_factory.mktemp("mixed")
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(d / "white.png")
    recs = []
    for i in range(5):
        images = [ImageRef("white.png", "PA")] if i in (0, 3) else []
        recs.append(
            Record(f"iu:CXR{i}", f"iu:CXR{i}", "iu", "train", "en", images, "No effusion.", "Normal.")
        )
    write_jsonl(d / "corpus.jsonl", recs)
    return d / "corpus.jsonl"


class _Tok:  # example() needs neither; the stream only stores them
    pass


def _stream(corpus, source):
    return StudyStream(
        str(corpus), tokenizer=_Tok(), processor=None, tokens_per_image=4, image_size=64, image_source=source
    )


def test_image_counts_equal_what_the_stream_fed(mixed_corpus):
    """The counts agree with the images `example` really returns (a real file is all white, a
    phantom is not), over one full epoch and part of the next."""
    stream = _stream(mixed_corpus, "auto")
    n = 8  # 1 epoch of 5 + 3 positions of the next permutation
    fed = {"real": 0, "phantom": 0}
    for k in range(n):
        pixels = np.asarray(stream.example(k).images[0])
        fed["real" if pixels.min() == 255 else "phantom"] += 1
    assert stream.image_counts(n) == fed
    assert fed["real"] >= 2 and fed["phantom"] >= 3  # both kinds occur: the check can tell them apart
    assert _stream(mixed_corpus, "phantom").image_counts(n) == {"real": 0, "phantom": n}


def test_image_provenance_is_carried_forward_stage_to_stage():
    ar = image_provenance({}, "ar", {"real": 0, "phantom": 40})
    assert ar == {"image_counts": {"ar": {"real": 0, "phantom": 40}}, "trained_on": "phantom"}
    rad = image_provenance(ar, "rad", {"real": 8, "phantom": 0})
    assert rad["trained_on"] == "mixed" and set(rad["image_counts"]) == {"ar", "rad"}
    dcd = image_provenance(rad, "dcd", None)  # a stage that does not count keeps what came before
    assert dcd["trained_on"] == "mixed" and dcd["image_counts"]["dcd"] is None
    assert image_provenance({}, "rad", {"real": 3, "phantom": 0})["trained_on"] == "real"
    assert "trained_on" not in image_provenance({}, "dcd", None)  # nothing counted: no claim
