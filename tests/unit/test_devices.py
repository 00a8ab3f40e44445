"""Device discovery and the placement plan (fastdeploy/devices.py), and the --devices setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastdeploy import devices
from fastdeploy.devices import CPU, Devices, Placement, describe, list_gpus, parse, plan, resolve
from fastdeploy.errors import SettingsError
from fastdeploy.settings import load_settings

SMI_LISTING = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-6b4c1e2a-0000-1111-2222-333344445555)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-7c5d2f3b-0000-1111-2222-333344445555)
  MIG 1g.5gb      Device  0: (UUID: MIG-8d6e3a4c-0000-1111-2222-333344445555)
GPU 2: NVIDIA L4 (UUID: GPU-9e7f4b5d-0000-1111-2222-333344445555)
"""


def fake_smi(folder: Path, script: str) -> str:
    """A PATH whose first folder holds an executable `nvidia-smi` running ``script`` (sh)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def listing_script(listing: str = SMI_LISTING) -> str:
    return f'[ "$1" = "-L" ] || exit 9\ncat <<"END"\n{listing}END\n'


@pytest.mark.parametrize("text, expected", [
    ("auto", ("auto",)), ("AUTO", ("auto",)), ("cpu", ("cpu",)), (" Cpu ", ("cpu",)),
    ("0", ("0",)), ("0,1", ("0", "1")), (" 3 , 1 ", ("3", "1")),
    ("GPU-6b4c1e2a-0000-1111,1", ("GPU-6b4c1e2a-0000-1111", "1")), ("MIG-GPU-6b4c/1/0", ("MIG-GPU-6b4c/1/0",)),
])
def test_parse_accepts_auto_cpu_and_gpu_lists(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text, says", [
    ("", "is not a GPU"), ("0,", "is not a GPU"), ("gpu0", "is not a GPU"), ("-1", "is not a GPU"),
    ("cuda:0", "is not a GPU"), ("0,cpu", "stand alone"), ("auto,1", "stand alone"), ("0,1,0", "twice"),
])
def test_parse_refuses_what_is_not_a_device_list(text, says):
    with pytest.raises(ValueError, match=says):
        parse(text)


def test_list_gpus_reads_nvidia_smi_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_smi(tmp_path / "bin", listing_script()))
    assert list_gpus() == ("0", "1", "2")  # the MIG line is not a GPU of its own


@pytest.mark.parametrize("script", ["echo 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n", "echo nothing\n"])
def test_a_failing_or_silent_nvidia_smi_means_no_gpu(tmp_path, monkeypatch, script):
    monkeypatch.setenv("PATH", fake_smi(tmp_path / "bin", script))
    assert list_gpus() == ()


def test_a_hanging_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_smi(tmp_path / "bin", "exec sleep 30\n"))
    monkeypatch.setattr(devices, "SMI_SECONDS", 0.3)
    assert list_gpus() == ()


def test_no_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert list_gpus() == ()
    assert resolve("auto", {}) == Devices((), False, "auto: no GPU found by nvidia-smi -L")


def test_resolve_auto_asks_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_smi(tmp_path / "bin", listing_script()))
    assert resolve("auto", {}) == Devices(("0", "1", "2"), False, "nvidia-smi -L")


@pytest.mark.parametrize("visible, gpus", [
    ("2,3", ("2", "3")), ("", ()), ("-1", ()), ("1,-1,0", ("1",)), ("GPU-6b4c1e2a", ("GPU-6b4c1e2a",)),
])
def test_resolve_auto_honours_the_cuda_visible_devices_it_was_started_with(tmp_path, monkeypatch, visible, gpus):
    monkeypatch.setenv("PATH", fake_smi(tmp_path / "bin", listing_script()))  # not asked
    assert resolve("auto", {"CUDA_VISIBLE_DEVICES": visible}) == Devices(gpus, False, "CUDA_VISIBLE_DEVICES")


def test_resolve_explicit_lists_and_cpu_ask_nobody(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_smi(tmp_path / "bin", "exit 1\n"))
    assert resolve("1,0", {"CUDA_VISIBLE_DEVICES": "5"}) == Devices(("1", "0"), False, "--devices")
    assert resolve("cpu", {}) == Devices((), True, "--devices cpu")


def test_plan_places_replicas_per_device_on_each_gpu_in_turn():
    placements = plan(Devices(("0", "1"), False, "--devices"), replicas=3, replicas_per_device=2, environ={})
    assert [p.device for p in placements] == ["0", "0", "1", "1"]  # --replicas counts CPU loops only
    assert placements[2].env == {"FASTDEPLOY_DEVICE": "1", "CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    placements[0].env["X"] = "1"
    assert "X" not in placements[1].env  # every slot has its own environment


def test_plan_keeps_a_device_order_the_environment_chose():
    placements = plan(Devices(("0",), False, "--devices"), 1, 1, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert placements == [Placement("0", {"FASTDEPLOY_DEVICE": "0", "CUDA_VISIBLE_DEVICES": "0"})]


def test_plan_keeps_cudas_own_order_for_gpus_an_inherited_cuda_visible_devices_named():
    """Indices from CUDA_VISIBLE_DEVICES were meant in CUDA's default order: PCI order would move them."""
    inherited = resolve("auto", {"CUDA_VISIBLE_DEVICES": "2,3"})
    placements = plan(inherited, 1, 1, {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert [p.env for p in placements] == [{"FASTDEPLOY_DEVICE": g, "CUDA_VISIBLE_DEVICES": g} for g in ("2", "3")]


def test_plan_on_the_cpu_multiplies_replicas_and_hides_gpus_only_when_asked():
    asked = plan(Devices((), True, "--devices cpu"), replicas=2, replicas_per_device=3, environ={})
    assert len(asked) == 6
    assert set(map(str, asked)) == {str(Placement(CPU, {"FASTDEPLOY_DEVICE": CPU, "CUDA_VISIBLE_DEVICES": ""}))}
    found_none = plan(Devices((), False, "auto"), replicas=2, replicas_per_device=1, environ={})
    assert found_none == [Placement(CPU, {"FASTDEPLOY_DEVICE": CPU})] * 2


def test_describe_says_the_layout_of_a_stage():
    assert describe(plan(Devices(("0", "1"), False, ""), 1, 2, {})) == "2 on GPU 0, 2 on GPU 1"
    assert describe(plan(Devices((), True, ""), 4, 1, {})) == "4 on cpu"


def test_settings_read_and_normalise_the_device_options(tmp_path):
    settings = load_settings(tmp_path, environ={})
    assert (settings.devices, settings.replicas_per_device) == ("auto", 1)
    settings = load_settings(tmp_path, {"devices": " 1, 0 "}, environ={"FASTDEPLOY_REPLICAS_PER_DEVICE": "2"})
    assert (settings.devices, settings.replicas_per_device) == ("1,0", 2)
    assert load_settings(tmp_path, environ={"FASTDEPLOY_DEVICES": "CPU"}).devices == "cpu"
    assert load_settings(tmp_path, environ=settings.to_env()).devices == "1,0"


@pytest.mark.parametrize("flags, environ, says", [
    ({"devices": "0,gpu1"}, {}, "--devices"), ({}, {"FASTDEPLOY_DEVICES": "cpu,0"}, "--devices"),
    ({"replicas_per_device": "0"}, {}, "--replicas-per-device"),
])
def test_bad_device_settings_name_the_option(tmp_path, flags, environ, says):
    with pytest.raises(SettingsError, match=says):
        load_settings(tmp_path, flags, environ=environ)

