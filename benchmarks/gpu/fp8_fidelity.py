"""PSNR and SSIM of every engine's output saved by bench_e2e.py (`--outputs DIR`) against one reference engine's
(the lossless diffserve path), written into the bench report and printed beside each engine's speed.

    python benchmarks/gpu/fp8_fidelity.py DIR --reference "diffserve+compile[fa3]" --report REPORT.json

The figures are `diffserve.accel.fidelity`'s (PSNR over all values, SSIM on the luminance per frame); the
diffusers row shows how far an independent lossless implementation lands (bf16 rounding and kernel order
only), the scale against which a lossy mode's figures are read.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from benchmarks.bench_e2e import _safe
from diffserve.accel.fidelity import psnr, ssim


def fidelity(outputs: Path, reference: str, engines: list[str]) -> dict[str, dict[str, float]]:
    """{engine: {"psnr_db", "ssim"}} of each engine's saved output against `reference`'s."""
    ref = np.load(outputs / f"{_safe(reference)}.npy")
    out = {}
    for name in engines:
        path = outputs / f"{_safe(name)}.npy"
        if name == reference or not path.exists():
            continue
        x = np.load(path)
        p = psnr(x, ref)
        out[name] = {"psnr_db": round(p, 2) if math.isfinite(p) else float("inf"), "ssim": round(ssim(x, ref), 4)}
    return out


def summary(report: dict, fid: dict[str, dict[str, float]], reference: str) -> str:
    """One line per engine: per-step and end-to-end time, speed-up against diffusers eager, PSNR/SSIM."""
    speed = report.get("speedup_vs_diffusers", {})
    head = (f"{report.get('workload')} on {report.get('card')}: {report.get('steps_timed')} steps timed, e2e at "
            f"{report.get('full_steps')}; fidelity against {reference} at the timed step count")
    lines = [head]
    for r in report.get("runs", []):
        name = r["engine"]
        s = speed.get(name, {})
        f = fid.get(name, {})
        vs = f"{s['per_step']:.2f}x / {s['e2e']:.2f}x" if s else "-"
        fq = f"PSNR {f['psnr_db']:6.2f} dB  SSIM {f['ssim']:.4f}" if f else ("reference" if name == reference else "-")
        lines.append(f"  {name:38s} {r['per_step_s']:8.4f} s/step {report['e2e_full_s'][name]:8.2f} s e2e  "
                     f"vs diffusers step/e2e {vs:>15s}  {fq}")
    lines += [f"  {n:38s} FAILED: {e}" for n, e in report.get("errors", {}).items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outputs", type=Path)
    ap.add_argument("--reference", required=True, help="engine name whose output is the lossless reference")
    ap.add_argument("--report", type=Path, required=True, help="bench_e2e.py's --out file (updated in place)")
    args = ap.parse_args()
    report = json.loads(args.report.read_text())
    engines = [r["engine"] for r in report.get("runs", [])]
    if not (args.outputs / f"{_safe(args.reference)}.npy").exists():
        raise SystemExit(f"no output of the reference {args.reference!r} in {args.outputs}")
    fid = fidelity(args.outputs, args.reference, engines)
    report["fidelity_reference"] = args.reference
    report["fidelity_vs_reference"] = fid
    args.report.write_text(json.dumps(report, indent=1))
    print(summary(report, fid, args.reference))


if __name__ == "__main__":
    main()
