"""Which devices the prediction loops run on, and the environment that puts each loop on its own.

``--devices auto`` asks ``nvidia-smi -L``, never a framework: importing torch in the
supervisor would cost seconds and, with CUDA, memory on every GPU. Each loop process then
gets ``CUDA_VISIBLE_DEVICES`` naming its one GPU (and ``FASTDEPLOY_DEVICE`` naming it for
the predictor and the heartbeat), so an unchanged torch or ONNX Runtime predictor that
uses "the GPU" (``cuda:0``) uses its own.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

AUTO = "auto"
CPU = "cpu"
SMI_SECONDS = 10.0  # a wedged driver can hang nvidia-smi; start-up must not hang with it
_GPU_ID = re.compile(r"\d+|(?:GPU|MIG)-[A-Za-z0-9/-]+")  # an index, or a UUID as nvidia-smi -L prints it
_SMI_LINE = re.compile(r"GPU (\d+):")


def parse(text: str) -> tuple[str, ...]:
    """The ``--devices`` setting: ``("auto",)``, ``("cpu",)`` or GPU ids; ValueError saying what is wrong."""
    items = [item.strip() for item in text.split(",")]
    lowered = [item.lower() for item in items]
    if lowered in ([AUTO], [CPU]):
        return (lowered[0],)
    if AUTO in lowered or CPU in lowered:
        raise ValueError(f"{text!r}: auto and cpu stand alone, not in a list of GPUs")
    for item in items:
        if not _GPU_ID.fullmatch(item):
            raise ValueError(f"{text!r}: {item!r} is not a GPU; give auto, cpu, or GPU indices or UUIDs "
                             "as nvidia-smi -L lists them, comma-separated, like 0,1")
    if len(set(items)) != len(items):
        raise ValueError(f"{text!r} names a GPU twice; use --replicas-per-device for more loops per GPU")
    return tuple(items)


@dataclass(frozen=True)
class Devices:
    """The devices this host's loops are placed on, resolved once at start-up."""

    gpus: tuple[str, ...]  # empty: the loops run on the CPU
    hide_gpus: bool  # --devices cpu: the loops must not see a GPU even where there is one
    found_by: str  # how they were chosen, for the start-up log


def list_gpus(command: str = "nvidia-smi") -> tuple[str, ...]:
    """The indices ``nvidia-smi -L`` lists; none where it is missing, fails or hangs."""
    binary = shutil.which(command)
    if binary is None:
        return ()
    try:
        done = subprocess.run([binary, "-L"], capture_output=True, text=True, timeout=SMI_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s -L did not answer (%s): no GPU is used", command, exc)
        return ()
    if done.returncode != 0:
        log.warning("%s -L failed (exit %d: %s): no GPU is used", command, done.returncode,
                    (done.stderr or done.stdout).strip()[:200])
        return ()
    return tuple(m.group(1) for line in done.stdout.splitlines() if (m := _SMI_LINE.match(line)))


def visible_gpus(value: str) -> tuple[str, ...]:
    """The GPUs an inherited CUDA_VISIBLE_DEVICES leaves visible: CUDA ignores an entry that is not a
    GPU (``-1``, the usual way to hide them all) and every entry after it."""
    gpus: list[str] = []
    for item in (i.strip() for i in value.split(",")):
        if not _GPU_ID.fullmatch(item):
            break
        gpus.append(item)
    return tuple(gpus)


def resolve(setting: str, environ: Mapping[str, str], command: str = "nvidia-smi") -> Devices:
    """What ``--devices`` means on this host. ``auto`` honours a CUDA_VISIBLE_DEVICES the service was
    started with (its GPUs, or none), else asks ``command -L``; no GPU means CPU."""
    ids = parse(setting)
    if ids == (CPU,):
        return Devices((), True, "--devices cpu")
    if ids != (AUTO,):
        return Devices(ids, False, "--devices")
    if "CUDA_VISIBLE_DEVICES" in environ:
        return Devices(visible_gpus(environ["CUDA_VISIBLE_DEVICES"]), False, "CUDA_VISIBLE_DEVICES")
    gpus = list_gpus(command)
    return Devices(gpus, False, f"{command} -L" if gpus else f"auto: no GPU found by {command} -L")


@dataclass(frozen=True)
class Placement:
    """One loop slot of a stage: its device and the variables its process gets."""

    device: str  # "cpu", or the GPU as CUDA_VISIBLE_DEVICES names it
    env: dict[str, str] = field(default_factory=dict)


def plan(devices: Devices, replicas: int, replicas_per_device: int, environ: Mapping[str, str]) -> list[Placement]:
    """The loops of one stage. On GPUs, ``replicas_per_device`` per GPU (``replicas`` is a CPU setting);
    on the CPU, ``replicas * replicas_per_device`` (the CPU counts as one device).

    A GPU loop gets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` unless the environment chose an order, so
    index n is the GPU nvidia-smi calls n; not when the indices came from an inherited
    CUDA_VISIBLE_DEVICES, which named them in CUDA's own order. A CPU loop hides GPUs (``CUDA_VISIBLE_DEVICES=""``)
    only when CPU was asked for: ``auto`` that found none leaves the environment alone, so a
    GPU nvidia-smi cannot see (another vendor's, or a container without the tool) stays usable.
    """
    if not devices.gpus:
        env = {"FASTDEPLOY_DEVICE": CPU, **({"CUDA_VISIBLE_DEVICES": ""} if devices.hide_gpus else {})}
        return [Placement(CPU, dict(env)) for _ in range(replicas * replicas_per_device)]
    inherited = "CUDA_DEVICE_ORDER" in environ or devices.found_by == "CUDA_VISIBLE_DEVICES"
    order = {} if inherited else {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    return [
        Placement(gpu, {"FASTDEPLOY_DEVICE": gpu, "CUDA_VISIBLE_DEVICES": gpu, **order})
        for gpu in devices.gpus
        for _ in range(replicas_per_device)
    ]


def describe(placements: Sequence[Placement]) -> str:
    """``2 on GPU 0, 2 on GPU 1`` or ``1 on cpu``: the layout of one stage, for the start-up log."""
    counts: dict[str, int] = {}
    for placement in placements:
        counts[placement.device] = counts.get(placement.device, 0) + 1
    return ", ".join(f"{n} on {'cpu' if d == CPU else 'GPU ' + d}" for d, n in counts.items())
