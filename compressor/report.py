"""What a run measured: per-module rows from each step, per-pass time and peak memory, warnings.

Written as ``report.json`` beside the exported checkpoint and printed as a table by ``apply``.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.arch import ArchAdapter
from compressor.modules.linear import QuantizedLinear


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process so far, and the device's peak allocation (GiB)."""
    numbers = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        numbers["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return numbers


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now: the CUDA allocator's free memory, or the host's MemAvailable
    (Linux); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def scheme_of(module: nn.Module):
    """What decides whether two layers can be fused: kind, static metadata, and which tensors exist."""
    if not isinstance(module, QuantizedLinear):
        return None
    present = tuple(name for name in module.tensor_names if getattr(module, name) is not None)
    return (module.weight_type.kind, tuple(sorted(module.weight_static.items())), present)


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def add_row(self, **row) -> None:
        self.rows.append(row)

    def add_step(self, steps: list[str], kind: str, seconds: float, memory: dict) -> None:
        self.passes.append(
            {"steps": steps, "kind": kind, "seconds": round(seconds, 3), **{k: round(v, 3) for k, v in memory.items()}}
        )

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def check_fused_groups(self, prefix: str, block: nn.Module, adapter: ArchAdapter) -> None:
        """Serving engines fuse q/k/v and gate/up: members of a group must share one scheme."""
        modules = dict(block.named_modules())
        for group in adapter.fused_groups:
            if any(adapter.linears[role] not in modules for role in group):
                continue  # a step restructured these layers (TransMLA's attention): nothing to fuse
            schemes = {scheme_of(modules[adapter.linears[role]]) for role in group}
            if len(schemes) > 1:
                names = ", ".join(adapter.linears[role] for role in group)
                self.warn(
                    f"{prefix}: {names} have different quantization schemes; vLLM fuses them and will refuse the "
                    "checkpoint"
                )

    def training_lines(self) -> list[str]:
        """One line per training phase: its held-out loss before and after, and how often the
        trained state was worse than the start and so undone (``compressor.training``)."""
        by_step: dict[str, list[dict]] = {}
        for row in self.rows:
            if "heldout_curve" in row:
                by_step.setdefault(row["step"], []).append(row)
        lines = []
        for step, rows in by_step.items():
            before = sum(r["heldout_curve"][0] for r in rows) / len(rows)
            after = sum(min(r["heldout_curve"]) for r in rows) / len(rows)
            undone = sum(r["kept_epoch"] == 0 for r in rows)
            where = f" in {len(rows)} blocks" if len(rows) > 1 else ""
            lines.append(
                f"{step}: held-out loss {before:.4g} -> {after:.4g}{where}; kept the untrained start {undone} of "
                f"{len(rows)} times"
            )
        return lines

    def to_dict(self) -> dict:
        return {"summary": self.summary, "passes": self.passes, "warnings": self.warnings, "modules": self.rows}

    @classmethod
    def from_dict(cls, saved: dict) -> Report:
        """The report ``to_dict`` wrote (``report.json``)."""
        return cls(rows=saved["modules"], passes=saved["passes"], warnings=saved["warnings"], summary=saved["summary"])

    def table(self) -> str:
        """A readable summary: one line per step and module kind, then totals and warnings."""
        lines = []
        by_step: dict[tuple, list[dict]] = {}
        for row in self.rows:
            kind = row["module"].rsplit(".", 1)[-1]
            by_step.setdefault((row["step"], kind), []).append(row)
        if by_step:
            step_width = max(len("step"), *(len(step) for step, _ in by_step)) + 2
            kind_width = max(len("module"), *(len(kind) for _, kind in by_step)) + 2
            lines.append(
                f"{'step':<{step_width}}{'module':<{kind_width}}{'count':>6}{'mean rel. error':>17}{'bits/weight':>13}"
            )
            for (step, kind), rows in by_step.items():
                errors = [r["error"] for r in rows if "error" in r]
                bits = [r["bits_per_weight"] for r in rows if "bits_per_weight" in r]
                error = f"{sum(errors) / len(errors):.4f}" if errors else "-"
                bpw = f"{sum(bits) / len(bits):.3f}" if bits else "-"
                lines.append(f"{step:<{step_width}}{kind:<{kind_width}}{len(rows):>6}{error:>17}{bpw:>13}")
        lines.extend(self.training_lines())
        lines.extend(
            f"{row['module']}: calibration tokens per expert {row['tokens_per_expert']}"
            for row in self.rows
            if "tokens_per_expert" in row
        )
        for item in self.passes:
            memory = ", ".join(f"{k} {v}" for k, v in item.items() if k.startswith("peak"))
            lines.append(f"pass {'+'.join(item['steps'])} ({item['kind']}): {item['seconds']:.1f} s, {memory}")
        for key, value in self.summary.items():
            lines.append(f"{key}: {value}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)
