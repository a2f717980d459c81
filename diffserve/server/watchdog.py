"""How long the worker may take: the heartbeat rule and each batch's deadline, from the batch's size and steps.

A batch's cost is the work it asks for: outputs x width x height x frames x denoising steps ("pixel-steps").
`BatchClock` learns the worker's speed in seconds per pixel-step from the batches it finishes (and from the
first steps of the batch in hand), and gives each batch the deadline

    started + base_s + slack x seconds_per_pixel_step x cost

`base_s` covers what does not scale with the cost (text encoding, VAE, encoding the MP4) and is the whole
allowance until a first step has been timed. A batch still running at its deadline is taken for hung: the
worker is killed and restarted and the batch's requests fail with 504 ``generation_timeout``. The
heartbeat rule catches a worker that is not scheduled at all (stopped, frozen machine): no message for
`heartbeat_timeout_s` while it serves and it is killed the same way (500 ``worker_stalled``). A batch whose
requests were all cancelled but which does not reach a step boundary (where it would stop) within
`cancel_grace_s`, or within the time the model took to load if that is longer, is ended the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffserve.config import GenerationRequest


def request_cost(req: GenerationRequest) -> int:
    """Pixel-steps of one validated request: outputs x width x height x frames x steps."""
    frames = req.num_frames or 1
    return int(req.num_outputs * (req.width or 0) * (req.height or 0) * frames * (req.num_inference_steps or 0))


@dataclass
class WatchdogConfig:
    """The limits the supervisor holds the worker to."""

    heartbeat_timeout_s: float = 30.0  # no message from a serving worker for this long: it is stalled
    batch_base_s: float = 300.0  # the fixed part of every batch's deadline
    slack: float = 4.0  # how many times its expected time a batch may take beyond base_s
    # A fully cancelled batch still running after this long (or after as long as the model took to load, if
    # longer: a restart would not free the worker sooner) is stopped by killing the worker.
    cancel_grace_s: float = 30.0


class BatchClock:
    """Learns seconds per pixel-step and turns a batch's cost into its deadline (thread-confined)."""

    def __init__(self, config: WatchdogConfig) -> None:
        self.config = config
        self.rate: float | None = None  # seconds per pixel-step: the slowest seen lately
        self.mean_batch_s: float | None = None  # average batch duration (Retry-After estimates)

    def deadline(self, started: float, cost: int, now: float, done: int = 0, total: int = 0) -> float:
        """When a batch of `cost` started at `started` must be over, after `done` of `total` steps at `now`."""
        rate = self.rate
        if done > 0 and total > 0 and cost > 0:
            measured = (now - started) / (cost * done / total)
            rate = measured if rate is None else max(rate, measured)
        extra = 0.0 if rate is None else self.config.slack * rate * cost
        return started + self.config.batch_base_s + extra

    def learn(self, cost: int, elapsed: float) -> None:
        """Record a finished batch; the rate decays by 10% a batch unless a slower one renews it."""
        if cost > 0:
            sample = elapsed / cost
            self.rate = sample if self.rate is None else max(sample, 0.9 * self.rate)
        self.mean_batch_s = elapsed if self.mean_batch_s is None else 0.8 * self.mean_batch_s + 0.2 * elapsed
