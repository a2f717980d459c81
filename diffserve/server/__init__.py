"""`diffserve serve`: an OpenAI-compatible HTTP API (images, image edits, video jobs) over one model.

Process layout: the front process runs FastAPI on uvicorn (`app`, `routes_*`), validates requests against
the model's defaults and queues them (`scheduler`); a supervisor thread (`supervisor`) cuts batches from the
queue and feeds them to the model worker, a separate spawned process that owns the `Engine` (`worker`),
relaying progress and results back and restarting the worker if it dies or stalls (`watchdog`: heartbeats,
batch deadlines). Video jobs live in `jobs` (SQLite, surviving restarts), output files in `outputs` (the one
place they are written; TTL and quota), metrics in `metrics`, request bodies, text checks and the error shape
in `protocol`, input images in `inputs`, the web playground at ``/`` in `playground` (its page, script and
style in ``static/playground``), the CLI in `cli`.
"""
