"""``python -m jem_ext.info``: how jem_ext was built and which devices it sees."""

from __future__ import annotations

import argparse
import platform

import torch

import jem_ext


def _op_names() -> list[str]:
    """The ops jem_ext registered with the dispatcher."""
    return sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("jem_ext::")
    )


def describe() -> str:
    """A human-readable report of the build facts and the visible devices."""
    info = jem_ext.build_info
    cuda = "no (CPU-only build)"
    if info["cuda"]:
        cuda = f"yes, CUDA {info['cuda_version']}, archs {info['cuda_archs']}"
    lines = [
        f"jem_ext {jem_ext.__version__}",
        f"  built against torch {info['torch_version']} (running torch {torch.__version__})",
        f"  CUDA kernels: {cuda}",
        f"  CPU kernels: {info['cpu_dispatch']}",
        f"  ops: {', '.join(_op_names())}",
        "devices:",
        f"  cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"  cuda:{i}: {props.name}, sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB"
            )
    else:
        lines.append("  cuda: none visible")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m jem_ext.info",
        description="Print how jem_ext was built (version, torch, CUDA archs) and the devices "
        "seen.",
    ).parse_args(argv)
    print(describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
