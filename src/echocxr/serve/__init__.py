"""`echocxr serve`: an OpenAI-compatible report server with per-block streaming and dynamic batching.

Data flow: HTTP request (app.py) -> decoded images (images.py) -> a `Job` on the batcher's queue
(batcher.py) -> one worker thread that owns the model (backend.py) decodes compatible jobs as one
batch and streams each row's committed blocks back to its request. Nothing here runs at import.
"""
