"""The one attention seam.

Every DiT calls an `AttentionOp` with q, k, v laid out (B, L, H, D) and gets (B, L, H, D) back.
Which kernel runs (torch SDPA and its cuDNN / flash / memory-efficient variants, FlashAttention 3 when
installed) is decided once when the engine starts, and a parallel wrapper (Ulysses, Ring) can be put
in front of the local kernel. A model file never imports a kernel library.

FlashAttention 3 (backend 'fa3', Hopper): the `fa3-fwd` wheel (`pip install "diffserve[fa3]"`, module
`fa3_fwd_interface`) or FlashAttention's own `flash_attn_interface`, found and imported the first time it is
asked for (`load_fa3`), never when this module is imported. The kernel runs behind the custom op
`diffserve::fa3_attention` (out and log-sum-exp, with a fake kernel), so `torch.compile` keeps it in the graph
without a break, and Ring attention merges with FA3's own log-sum-exp. It takes bf16 with head sizes that
are multiples of 8 up to 256 on CUDA tensors; anything else goes to torch's SDPA (`fused_kernel_fits`).

FP8 attention (`AttentionOp.configure(fp8=True)`, `--fp8 attention`, backend 'fa3' only): FA3's e4m3
kernels on q, k, v quantized per (sample, head), keys centred first (`diffserve.layers.fp8`), behind the
custom op `diffserve::fa3_fp8_attention`. Lossy: see `diffserve.layers.fp8`.

SageAttention (backend 'sage', `pip install sageattention==1.0.6`, Triton, CUDA): INT8 Q.K^T with fp16 P.V,
lossy. Loaded on first use (`load_sage`) and run behind the custom op `diffserve::sage_attention`; the keys
are centred here, out of place (the package's own smoothing subtracts in place from the caller's tensor). It
returns no log-sum-exp, so Ring attention refuses it (`check_ring_backend`); it takes fp16/bf16 CUDA tensors
with head sizes 64, 96 or 128 (else SDPA, `fused_kernel_fits`).

Key padding: a call may carry `kv_mask` (B, Lk) bool, True = a real key. No kernel ever sees a dense
mask (it would force SDPA onto its slow path): the padded keys are dropped before the kernel runs
(`KeySelection`). All keys real -> the plain call; every sample keeping the same keys -> one call on a
prefix view `k[:, :n]` (or one `index_select` when the shared keys are not a prefix); otherwise one call
per sample (the batch is small: prompts x CFG branches) on that sample's keys. Deciding between these
costs one host sync per masked call: a single `.tolist()` of a (3, B) tensor of per-sample statistics
(`plan_key_selections`; a mask kept on the CPU costs no device sync at all); the indices of non-prefix
masks are computed on the mask's device without another. Under sequence parallelism the plan is made once
per forward from the layout (`diffserve.layers.parallel`), not per call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from diffserve.errors import UserError
from diffserve.layers.fp8 import lse_shift, quantize_heads, smooth_keys

# (B, L, H, D) x3 -> (B, L, H, D)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "math", "fa3", "sage")
LOSSY_BACKENDS = ("sage",)  # backends whose results differ from exact attention by more than rounding


class BackendUnavailableError(UserError, ValueError):
    """An attention backend (or its FP8 mode) that cannot run here: one line for the CLI and server (a
    UserError), still a ValueError for callers that catch those."""


class MaskedAttentionFn(Protocol):
    """The seam's local kernel: (B, Lq, H, D), (B, Lk, H, D) x2, kv_mask (B, Lk) bool -> (B, Lq, H, D)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_mask: torch.Tensor | None = None) -> torch.Tensor: ...


class ParallelAttention(Protocol):
    """A wrapper that distributes attention over ranks and calls `local` on each rank's share.

    `local` is called as `local(q, k, v)` on dense, real keys, or as `local(q, k, v, kv_mask=...)` when
    the wrapper hands a mask through unchanged."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: MaskedAttentionFn,
                 kv_mask: torch.Tensor | None = None) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------
# Key padding: which keys each sample keeps, decided once on the host

# A sample's kept keys: None (every key), a prefix length n (keys [0, n)), or the int64 indices (n,).
Keep = int | torch.Tensor | None


def take_keys(x: torch.Tensor, keep: Keep) -> torch.Tensor:
    """The kept positions of x (B, Lk, H, D) along dim 1: x itself for every key, a view for a prefix,
    a gathered copy for indices."""
    if keep is None:
        return x
    if isinstance(keep, int):
        return x.narrow(1, 0, keep)
    return x.index_select(1, keep)


@dataclass(frozen=True)
class KeySelection:
    """Which keys of a length-`length` key sequence each sample of a batch attends to.

    `shared`: `keys` holds one entry that applies to every sample (of any batch size when `batch` is
    None, i.e. the selection came from a mask shared by the batch); otherwise `keys` and `counts` hold
    one entry per sample of a batch of `batch`. `counts` are the numbers of kept keys (`length` for a
    sample that keeps every key, whose entry is None: its keys are passed on as they are).
    """

    length: int
    keys: tuple[Keep, ...]
    counts: tuple[int, ...]
    shared: bool
    batch: int | None

    @classmethod
    def every_key(cls, length: int) -> KeySelection:
        """No padding: every sample attends to all `length` keys."""
        return cls(length, (None,), (length,), True, None)

    def count(self, sample: int) -> int:
        """Kept keys of `sample`."""
        return self.counts[0] if self.shared else self.counts[sample]

    def check_batch(self, batch: int) -> None:
        if self.batch is not None and self.batch != batch:
            raise ValueError(f"the key mask was made for a batch of {self.batch} samples, but attention got "
                             f"a batch of {batch}")

    def pieces(self, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The kernel calls this selection asks for: (rows, q[rows], kept k[rows], kept v[rows]), rows a
        slice of the batch (all of it when shared). Samples that keep no key are skipped.
        q (B, Lq, H, D); k, v (B, Lk, H, D)."""
        if self.shared:
            if self.counts[0]:
                keep = self.keys[0]
                yield slice(None), q, take_keys(k, keep), take_keys(v, keep)
            return
        for b, (keep, n) in enumerate(zip(self.keys, self.counts)):
            if n:
                rows = slice(b, b + 1)
                yield rows, q[rows], take_keys(k[rows], keep), take_keys(v[rows], keep)


def plan_key_selections(masks: torch.Tensor, device: torch.device,
                        any_batch: bool = False) -> list[KeySelection]:
    """One `KeySelection` per group of `masks` (G, B, L) bool (True = real key), with index tensors on
    `device`. `any_batch`: the masks are shared by the batch (B == 1) and the selections apply to any
    batch size. Costs exactly one host sync (a `.tolist()` of (3, G, B) statistics); the indices of
    non-prefix masks are sorted out on the masks' device."""
    if masks.dtype != torch.bool or masks.ndim != 3:
        raise ValueError(f"key masks must be bool (G, B, L), got {masks.dtype} {tuple(masks.shape)}")
    g, b, length = masks.shape
    counts = masks.sum(-1)  # (G, B)
    prefix = (masks == (torch.arange(length, device=masks.device) < counts.unsqueeze(-1))).all(-1)
    same = (masks == masks[:, :1]).all(-1).all(-1, keepdim=True).expand(g, b)  # (G, B)
    stats = torch.stack([counts, prefix.long(), same.long()]).tolist()  # the one host sync
    order: torch.Tensor | None = None  # (G, B, L): the real keys' positions first, in order

    def keep(gi: int, bi: int) -> Keep:
        nonlocal order
        n = stats[0][gi][bi]
        if stats[1][gi][bi]:
            return None if n == length else n
        if order is None:
            order = torch.argsort((~masks).to(torch.uint8), dim=-1, stable=True).to(device)
        return order[gi, bi, :n]

    plans = []
    for gi in range(g):
        if stats[2][gi][0]:
            plans.append(KeySelection(length, (keep(gi, 0),), (stats[0][gi][0],), True,
                                      None if any_batch else b))
        else:
            plans.append(KeySelection(length, tuple(keep(gi, bi) for bi in range(b)), tuple(stats[0][gi]),
                                      False, b))
    return plans


def key_selection(kv_mask: torch.Tensor, k: torch.Tensor) -> KeySelection:
    """The selection of one attention call's kv_mask (B, Lk) bool for keys k (B, Lk, H, D); a sample with
    no real key is an error (its softmax would have nothing to normalise over)."""
    if kv_mask.dtype != torch.bool or tuple(kv_mask.shape) != tuple(k.shape[:2]):
        raise ValueError(f"kv_mask must be a bool tensor of shape (batch, keys) = {tuple(k.shape[:2])}, got "
                         f"{kv_mask.dtype} {tuple(kv_mask.shape)}")
    sel = plan_key_selections(kv_mask.unsqueeze(0), k.device)[0]
    empty = [b for b in range(k.shape[0]) if sel.count(b) == 0]
    if empty:
        raise ValueError(f"kv_mask: sample(s) {empty} of the batch have no real key (every key is masked); "
                         "attention needs at least one valid key per sample")
    return sel


def attend_selected(kernel: AttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    sel: KeySelection) -> torch.Tensor:
    """`kernel` on the kept keys only: one call when the selection is shared, else one per sample (every
    sample must keep at least one key). q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    sel.check_batch(q.shape[0])
    outs = [kernel(qr, kr, vr) for _, qr, kr, vr in sel.pieces(q, k, v)]
    if len(outs) != (1 if sel.shared else q.shape[0]):
        raise ValueError("attention: a sample has no real key (every key is masked)")
    return outs[0] if sel.shared else torch.cat(outs, 0)


def _sdpa_kernel_context(backend: str):
    if backend == "sdpa":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    return sdpa_kernel([kind])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention, (B, L, H, D) in and out, through torch SDPA."""
    with _sdpa_kernel_context(backend):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# FlashAttention 3

# Modules that provide FA3's `flash_attn_func`, in order of preference: the fa3-fwd wheel, then FA3's own
# build (PyPI's flash-attn-interface 0.0.1 is an empty placeholder of that name: it has no flash_attn_func).
FA3_MODULES = ("fa3_fwd_interface", "flash_attn_interface")
FA3_DTYPES = (torch.bfloat16,)  # fa3-fwd is built without fp16 (FLASHATTENTION_DISABLE_FP16); fp8 built too
FA3_MAX_HEAD_DIM = 256  # head sizes are multiples of 8, rounded up to the built sizes 64/96/128/192/256


@dataclass(frozen=True)
class Fa3Kernel:
    """An importable FlashAttention 3: the module it came from and its `flash_attn_func`. `lse_flag`:
    the function takes `return_attn_probs=True` to return (out, lse) (current FA3; older builds always
    return the pair)."""

    module: str
    func: Callable[..., object]
    lse_flag: bool


def _alias_fa3_config() -> None:
    """fa3-fwd ships FA3's build configuration as `fa3_fwd_config`, while its interface's
    `round_up_headdim` does `from flash_attn_config import CONFIG`: register the former under the latter
    name (unless a `flash_attn_config` is already loaded). Called once, when fa3_fwd_interface is loaded."""
    if "flash_attn_config" in sys.modules:
        return
    try:
        config = importlib.import_module("fa3_fwd_config")
    except ImportError:
        return
    sys.modules["flash_attn_config"] = config


def _takes_lse_flag(func: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False
    return "return_attn_probs" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@functools.cache
def load_fa3() -> Fa3Kernel | None:
    """The first of `FA3_MODULES` that imports and has a callable `flash_attn_func`, or None. Imported
    once per process, on first use (an installed wheel whose CUDA libraries do not load counts as absent)."""
    for name in FA3_MODULES:
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError):
            continue
        func = getattr(module, "flash_attn_func", None)
        if not callable(func):
            continue
        if name == "fa3_fwd_interface":
            _alias_fa3_config()
        return Fa3Kernel(name, func, _takes_lse_flag(func))
    return None


def fa3_available() -> bool:
    """Whether a FlashAttention 3 `flash_attn_func` imports (`load_fa3`). (A package of FA3's module name
    on PyPI, flash-attn-interface 0.0.1, is an empty placeholder: having the module is not enough.)"""
    return load_fa3() is not None


@torch.library.custom_op("diffserve::fa3_attention", mutates_args=())
def fa3_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention 3 with its log-sum-exp: q (B, Lq, H, D), k/v (B, Lk, H, D) -> out (B, Lq, H, D) in
    q's dtype, lse (B, H, Lq) float32 (natural log of each query row's softmax denominator). A custom op,
    so that torch.compile calls the kernel as it is."""
    fa3 = load_fa3()
    if fa3 is None:
        raise RuntimeError('FlashAttention 3 is not installed (pip install "diffserve[fa3]")')
    res = fa3.func(q, k, v, return_attn_probs=True) if fa3.lse_flag else fa3.func(q, k, v)
    if not isinstance(res, (tuple, list)) or len(res) < 2:
        raise RuntimeError(f"{fa3.module}.flash_attn_func returned no log-sum-exp (expected (out, lse, ...))")
    out, lse = res[0], res[1]
    b, lq, h, _ = q.shape
    if tuple(lse.shape) != (b, h, lq):
        raise RuntimeError(f"{fa3.module}.flash_attn_func returned lse of shape {tuple(lse.shape)}, expected "
                           f"(batch, heads, queries) = {(b, h, lq)}")
    return out.contiguous(), lse.float().contiguous()


@fa3_attention_lse.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, lq, h, _ = q.shape
    return q.new_empty(b, lq, h, v.shape[-1]), q.new_empty(b, h, lq, dtype=torch.float32)


@register_flop_formula(torch.ops.diffserve.fa3_attention)
def _fa3_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV, as torch's counter counts SDPA."""
    b, lq, h, d = q_shape
    return 2 * b * h * lq * k_shape[1] * (d + v_shape[-1])


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 3, (B, L, H, D) in and out (the output of `fa3_attention_lse`)."""
    return fa3_attention_lse(q, k, v)[0]


@torch.library.custom_op("diffserve::fa3_fp8_attention", mutates_args=())
def fa3_fp8_attention_raw(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                          k_descale: torch.Tensor, v_descale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention 3 on e4m3 inputs: q8 (B, Lq, H, D), k8/v8 (B, Lk, H, D) float8_e4m3fn, descales (B, H)
    float32 -> out (B, Lq, H, D) bf16, lse (B, H, Lq) float32 of the dequantized scores."""
    fa3 = load_fa3()
    if fa3 is None:
        raise RuntimeError('FlashAttention 3 is not installed (pip install "diffserve[fa3]")')
    res = fa3.func(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                   return_attn_probs=True)
    if not isinstance(res, (tuple, list)) or len(res) < 2:
        raise RuntimeError(f"{fa3.module}.flash_attn_func returned no log-sum-exp (expected (out, lse, ...))")
    return res[0].contiguous(), res[1].float().contiguous()


@fa3_fp8_attention_raw.register_fake
def _(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor, k_descale: torch.Tensor,
      v_descale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, lq, h, _ = q8.shape
    return (q8.new_empty(b, lq, h, v8.shape[-1], dtype=torch.bfloat16),
            q8.new_empty(b, h, lq, dtype=torch.float32))


@register_flop_formula(torch.ops.diffserve.fa3_fp8_attention)
def _fa3_fp8_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    b, lq, h, d = q_shape
    return 2 * b * h * lq * k_shape[1] * (d + v_shape[-1])


def fa3_fp8_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 FlashAttention 3 on bf16 q (B, Lq, H, D), k/v (B, Lk, H, D): keys centred, q/k/v quantized per
    (sample, head) (traced, so torch.compile fuses it), then the e4m3 kernel -> out (B, Lq, H, D) bf16 and
    lse (B, H, Lq) float32, corrected for the centring when `with_lse` (else the centred keys' lse)."""
    ks, mean = smooth_keys(k)
    (q8, qd), (k8, kd), (v8, vd) = quantize_heads(q), quantize_heads(ks), quantize_heads(v)
    out, lse = fa3_fp8_attention_raw(q8, k8, v8, qd, kd, vd)
    return out.to(q.dtype), (lse + lse_shift(q, mean) if with_lse else lse)


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FP8 FlashAttention 3, (B, L, H, D) in and out (`fa3_fp8_attention_lse` without the lse fix-up)."""
    return fa3_fp8_attention_lse(q, k, v, with_lse=False)[0]


# ----------------------------------------------------------------------------------------------------------
# SageAttention

SAGE_HEAD_DIMS = (64, 96, 128)


@functools.cache
def load_sage() -> Callable[..., torch.Tensor] | None:
    """`sageattention.sageattn`, imported once on first use, or None when it (or Triton) does not import."""
    try:
        module = importlib.import_module("sageattention")
    except (ImportError, OSError, RuntimeError):
        return None
    func = getattr(module, "sageattn", None)
    return func if callable(func) else None


def sage_available() -> bool:
    return load_sage() is not None


@torch.library.custom_op("diffserve::sage_attention", mutates_args=())
def sage_attention_raw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention on q (B, Lq, H, D), k/v (B, Lk, H, D) fp16/bf16 (keys already centred) -> (B, Lq, H, D)."""
    sage = load_sage()
    if sage is None:
        raise RuntimeError("SageAttention is not installed (pip install sageattention==1.0.6)")
    return sage(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="NHD", is_causal=False,
                smooth_k=False)


@sage_attention_raw.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, lq, h, _ = q.shape
    return q.new_empty(b, lq, h, v.shape[-1])


@register_flop_formula(torch.ops.diffserve.sage_attention)
def _sage_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    b, lq, h, d = q_shape
    return 2 * b * h * lq * k_shape[1] * (d + v_shape[-1])


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention, (B, L, H, D) in and out; the keys are centred here, out of place (softmax is unchanged
    by a shift shared by all keys)."""
    return sage_attention_raw(q, smooth_keys(k)[0], v)


def check_ring_backend(backend: str, fp8: bool = False) -> None:
    """Ring attention merges partial results with each kernel's log-sum-exp: refuse what gives none
    (SageAttention) and the FP8 attention path (not wired into Ring)."""
    if backend == "sage":
        raise UserError("attention backend 'sage' returns no log-sum-exp, which Ring attention needs to merge "
                        "its blocks; use --ring-degree 1 (Ulysses works) or another backend (fa3, cudnn)",
                        param="ring_degree")
    if fp8:
        raise UserError("FP8 attention is not supported under Ring attention; use --ring-degree 1 (Ulysses "
                        "works) or --fp8 linear", param="ring_degree")


def default_backend(device: torch.device) -> str:
    """The fastest backend known to be right on `device`: FA3 on Hopper (compute capability 9.x) when it
    imports, else cuDNN SDPA on Hopper and newer, else torch's SDPA (always on the CPU)."""
    if device.type != "cuda":
        return "sdpa"
    major = torch.cuda.get_device_capability(device)[0]
    if major == 9 and fa3_available():
        return "fa3"
    if major >= 9 and torch.backends.cudnn.is_available():
        return "cudnn"
    return "sdpa"


def fused_kernel_fits(backend: str, q: torch.Tensor) -> bool:
    """Whether the half-precision fused kernels (cuDNN, flash, FA3, Sage) take these inputs; otherwise the
    caller falls back to torch's own SDPA choice (fp32 runs, odd head sizes, CPU tensors; for FA3 also
    fp16, which the fa3-fwd build leaves out; for Sage head sizes other than 64/96/128)."""
    if backend in ("sdpa", "math", "efficient"):
        return True
    if not q.is_cuda or q.shape[-1] % 8:
        return False
    if backend == "fa3":
        return q.dtype in FA3_DTYPES and q.shape[-1] <= FA3_MAX_HEAD_DIM
    if backend == "sage":
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in SAGE_HEAD_DIMS
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= (128 if backend == "cudnn" else 256)


class AttentionOp:
    """Callable attention shared by all blocks of one model.

    One instance per model; `configure` changes the kernel or installs a parallel wrapper for every
    block at once (it is called by engine-level transforms, never by model code).
    """

    def __init__(self, backend: str = "sdpa", fp8: bool = False) -> None:
        self.backend = "sdpa"
        self.fp8 = False  # FP8 FlashAttention 3 (lossy); only with backend 'fa3'
        self.parallel: ParallelAttention | None = None
        self.configure(backend=backend, fp8=fp8)

    def configure(self, backend: str | None = None, parallel: ParallelAttention | None = None,
                  fp8: bool | None = None) -> None:
        if backend is not None:
            if backend not in BACKENDS:
                raise BackendUnavailableError(f"unknown attention backend {backend!r}; accepted: "
                                              f"{', '.join(BACKENDS)}", param="attention_backend")
            if backend == "fa3" and not fa3_available():
                raise BackendUnavailableError(
                    "attention backend 'fa3' needs FlashAttention 3: pip install \"diffserve[fa3]\" (the fa3-fwd "
                    "wheel, Linux x86_64, Hopper GPUs) or FA3's own flash_attn_interface", param="attention_backend")
            if backend == "sage" and not sage_available():
                raise BackendUnavailableError("attention backend 'sage' needs SageAttention: pip install "
                                              "sageattention==1.0.6 (Triton, CUDA GPUs)", param="attention_backend")
            self.backend = backend
        if fp8 is not None:
            if fp8 and self.backend != "fa3":
                raise BackendUnavailableError(
                    f"FP8 attention runs on FlashAttention 3's FP8 kernels: it needs attention backend 'fa3' "
                    f"(Hopper, pip install \"diffserve[fa3]\"), not {self.backend!r}", param="fp8")
            self.fp8 = fp8
        if parallel is not None:
            self.parallel = parallel

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The configured kernel on dense inputs (every key real). (B, Lq, H, D), (B, Lk, H, D) x2 ->
        (B, Lq, H, D)."""
        backend = self.backend if fused_kernel_fits(self.backend, q) else "sdpa"
        if backend == "fa3":
            return fa3_fp8_attention(q, k, v) if self.fp8 else fa3_attention(q, k, v)
        if backend == "sage":
            return sage_attention(q, k, v)
        return sdpa_attention(q, k, v, backend)

    def local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention on this rank's tensors only: q (B, Lq, H, D), k/v (B, Lk, H, D), kv_mask (B, Lk) bool
        (True = real key; None = all real) -> (B, Lq, H, D). Padded keys are dropped before the kernel
        (one host sync per masked call, see the module docstring)."""
        if kv_mask is None:
            return self.dense(q, k, v)
        return attend_selected(self.dense, q, k, v, key_selection(kv_mask, k))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention through the parallel wrapper when one is installed. q (B, Lq, H, D), k/v
        (B, Lk, H, D), kv_mask (B, Lk) bool or None -> (B, Lq, H, D)."""
        if self.parallel is not None:
            return self.parallel(q, k, v, self.local, kv_mask)
        return self.local(q, k, v) if kv_mask is None else self.local(q, k, v, kv_mask)
