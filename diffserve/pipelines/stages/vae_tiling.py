"""Whether a VAE decodes in tiles: `EngineConfig.vae_tiling` when set, else tiled only on a GPU where the
untiled decode is estimated not to fit the memory free at decode time.

diffusers' tiled decoders (AutoencoderKL, AutoencoderKLWan, AutoencoderKLQwenImage,
AutoencoderKLHunyuanVideo) decode overlapping tiles and blend their seams, so a tiled decode is close to the
untiled one but not bit-exact; tile sizes are the VAE's own (`tile_sample_min_*` attributes).

The estimate is deliberately rough: about four activations of the decoder's widest full-resolution stage
alive at once, over the frames the VAE decodes in one pass, plus the float32 output.
"""

from __future__ import annotations

import torch

FIT_SHARE = 0.9  # tiled when the estimate exceeds this share of the free memory


def decode_bytes(channels: int, frames: int, height: int, width: int, dtype: torch.dtype,
                 output_frames: int | None = None) -> int:
    """Estimated peak bytes of an untiled decode: 4 activations of `channels` channels over `frames` frames
    of height x width pixels in `dtype`, plus the (3, output_frames, H, W) float32 output."""
    out = 3 * (output_frames or frames) * height * width * 4
    return 4 * channels * frames * height * width * torch.finfo(dtype).bits // 8 + out


def widest_decoder_channels(block_out_channels: list[int] | tuple[int, ...]) -> int:
    """AutoencoderKL's decoder: the full-resolution channel count equivalent of its widest stage. Stage l
    (resolution / 2**l) holds the channels of the stage below it after upsampling, so its cost per output
    pixel is channels[min(l + 1, n - 1)] / 4**l."""
    n = len(block_out_channels)
    return max(int(block_out_channels[min(level + 1, n - 1)]) // 4**level for level in range(n))


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes the device can still give this process: the driver's free memory plus what torch's caching
    allocator holds but does not use. None on a CPU (no limit that tiling would help with)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def use_tiling(setting: bool | None, estimate: int, device: torch.device) -> bool:
    """`setting` when given; otherwise (auto) tiled only when `estimate` bytes do not fit FIT_SHARE of the
    device's free memory (never on a CPU)."""
    if setting is not None:
        return setting
    free = free_device_bytes(device)
    return free is not None and estimate > FIT_SHARE * free


def set_tiling(vae: torch.nn.Module, tiled: bool) -> None:
    """Switch a diffusers VAE's tiled decoding on or off (its tile sizes are kept)."""
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
