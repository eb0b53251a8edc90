"""What export and quantize print: each artifact of a bundle and how it was checked."""

from __future__ import annotations

from edgegen.runtime.manifest import Manifest


def bundle_summary(manifest: Manifest) -> str:
    """One line per artifact: size, and its parity (fp32) or quality and coverage."""
    lines = [
        f"{manifest.directory}: {manifest.config.family} bundle, checked against eager PyTorch"
    ]
    reports = manifest.data["parity"]["artifacts"]
    fp32 = {a.format: a.bytes for a in manifest.artifacts if a.precision == "fp32"}
    for artifact in manifest.artifacts:
        report = reports[artifact.path]
        size = f"{artifact.bytes / 1e6:7.2f} MB"
        if artifact.precision == "fp32":
            result = (
                f"max |diff| {report['max_abs_diff']:.1e} ({report['relative']:.1e} of the "
                f"logits' scale) <= {report['tolerance']:.0e} over {len(report['checks'])} checks"
            )
        else:
            q = report["quality"]
            ratio = (
                artifact.bytes / fp32[artifact.format] if artifact.format in fp32 else float("nan")
            )
            cov = artifact.quantization or {}
            result = (
                f"{ratio:4.0%} of fp32; ppl {q['ppl_change']:+.2%}, top-1 {q['top1']:.1%}, "
                f"KL {q['kl']:.1e}; embedding {cov.get('embedding', '?')}, "
                f"head {cov.get('head', '?')}"
            )
        lines.append(
            f"  {artifact.path:<16} {artifact.format:<12} {artifact.precision:<5} {size}  "
            f"{result}: pass"
        )
    return "\n".join(lines)
