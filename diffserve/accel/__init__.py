"""Opt-in accelerations that trade some fidelity for speed (off by default), applied as explicit transforms
after a model is built: `step_cache` (reuse the residual of most blocks across denoising steps) and its
settings (`cache_config`), with `fidelity` (PSNR, SSIM) to measure what each costs."""
