"""Device and host health: NVML on GPU servers, what the host can tell elsewhere.

A :class:`HealthSampler` runs in a thread of the front's process (never in the loop: an NVML
call can block for seconds on a GPU that is failing). Every ``interval_s`` it reads each pool
device's figures (NVML through ``nvidia-ml-py``: temperature, fan, power and its limit, SM and
memory clocks, utilization, memory, ECC error counts, throttle reasons, energy; and the XID events
a second thread waits for) and the host's (load, CPU utilization, memory, temperature from the
kernel's thermal zones), decides each device's health, and publishes the result as one new
immutable snapshot (:attr:`HealthSampler.latest`): the loop reads it in its housekeeping, the HTTP
thread when it renders. Nothing is shared that either side changes.

A device is unhealthy, and stops taking new sessions (its sessions go on), when:

- it has uncorrectable ECC errors (volatile count above zero) or a row remapping failed;
- an XID error other than the ones a program causes itself (13, 31, 43, 45, 68, 109: the NVIDIA
  device plugin's list of application errors) was reported: sticky until the daemon restarts, as
  in the device plugin. A tenant's illegal address (XID 13/31) must not take a device from the
  others;
- its temperature is at or above the limit (``--health-max-temperature``, default: NVML's slowdown
  threshold less 5 °C, or 90 °C), until it is 5 °C below it again;
- NVML says the GPU is lost.

On a daemon without NVML (the CPU backend, a machine without the driver, ``nvidia-ml-py`` not
installed) every GPU figure is ``None`` and named in ``unavailable`` with the reason; the host's
figures are still there. Sampling never raises: a failing call is a missing figure.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("libremote.server")

#: XIDs a program causes itself (the NVIDIA device plugin ignores them for health): a tenant's
#: bad kernel must not make a shared device unhealthy for everyone.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
#: What some XIDs mean (for the log and status; others are named by number).
XID_MEANINGS = {
    48: "double-bit ECC error", 63: "ECC page retirement or row remapping", 64: "row remapping failure",
    74: "NVLink error", 79: "GPU has fallen off the bus", 92: "high single-bit ECC error rate",
    94: "contained ECC error", 95: "uncontained ECC error", 119: "GSP RPC timeout", 120: "GSP error",
    140: "unrecovered ECC error",
}
DEFAULT_MAX_TEMPERATURE_C = 90.0
TEMPERATURE_HYSTERESIS_C = 5.0
#: Throttle reason bits (nvmlClocksThrottleReason*), named as DCGM and nvidia-smi name them.
THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
#: Each device's GPU figures (None where unavailable), in this order in status.
GPU_FIELDS = ("temperature_c", "temperature_limit_c", "fan_ratio", "power_w", "power_limit_w", "sm_clock_hz",
              "memory_clock_hz", "utilization", "memory_utilization", "memory_used_bytes", "memory_total_bytes",
              "ecc_corrected", "ecc_uncorrected", "energy_j", "throttle_reasons")
#: Unhealthy reasons, by kind (a bounded set: the metrics' label values).
REASON_KINDS = ("ecc", "row_remap", "xid", "temperature", "lost", "injected")


@dataclass(frozen=True)
class DeviceRef:
    """A pool device as the sampler needs it: the front's index and spec, and the GPU's UUID
    (from the zygote's probe) to find it in NVML whatever CUDA_VISIBLE_DEVICES says."""

    index: int
    spec: str
    uuid: str | None = None


def _nvml_module() -> Any:
    try:
        import pynvml  # nvidia-ml-py (torch-free: ctypes over libnvidia-ml.so)
    except Exception:  # noqa: BLE001 (any import failure is "not installed")
        return None
    return pynvml


class HealthSampler:
    """Samples the pool's devices and the host in a thread; :attr:`latest` is the last snapshot."""

    def __init__(self, devices: list[DeviceRef], *, interval_s: float = 5.0, max_temperature_c: float | None = None,
                 inject_path: str | None = None, nvml: Any = "auto") -> None:
        self.devices = devices
        self.interval_s = interval_s
        self.max_temperature_c = max_temperature_c
        self.inject_path = inject_path
        self._nvml = _nvml_module() if nvml == "auto" else nvml
        self._nvml_error: str | None = None
        self._handles: dict[int, Any] = {}
        self._events: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()  # (device index, xid)
        self._xids: dict[int, dict[int, int]] = {}  # device -> xid -> count (the sampler thread's own)
        self._hot: set[int] = set()
        self._cpu_times: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: The last snapshot (replaced whole, never changed): {"time", "source", "host", "devices": {index: row}}.
        self.latest: dict[str, Any] = {"time": 0.0, "source": "none", "host": {}, "devices": {
            ref.index: {"index": ref.index, "healthy": True, "reasons": [], "source": "none"} for ref in devices}}
        self.samples = 0

    # ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._open_nvml()
        self.sample()  # (the first snapshot before the daemon says it listens)
        if self.interval_s > 0:
            self._spawn(self._run, "libremote-health")
        if self._handles:
            self._spawn(self._watch_xids, "libremote-xid")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        if self._nvml is not None and self._handles:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    # ------------------------------------------------------------------------------------------
    # NVML
    # ------------------------------------------------------------------------------------------
    def _open_nvml(self) -> None:
        gpus = [ref for ref in self.devices if ref.spec.startswith("cuda")]
        if not gpus:
            self._nvml_error = "not a GPU (the CPU backend)"
            return
        if self._nvml is None:
            self._nvml_error = "nvidia-ml-py is not installed (pip install libremote[metrics])"
            return
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 (no driver, no libnvidia-ml.so)
            self._nvml_error = f"NVML is not available ({exc})"
            return
        for ref in gpus:
            try:
                if ref.uuid:
                    handle = nvml.nvmlDeviceGetHandleByUUID(ref.uuid)
                else:
                    handle = nvml.nvmlDeviceGetHandleByIndex(int(ref.spec.partition(":")[2] or 0))
                self._handles[ref.index] = handle
            except Exception as exc:  # noqa: BLE001
                log.warning("NVML does not know device %d (%s): %s", ref.index, ref.spec, exc)

    def _watch_xids(self) -> None:
        """Wait for XID events (a blocking NVML call: its own thread) and queue them."""
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
            by_handle: list[tuple[Any, int]] = []
            for index, handle in self._handles.items():
                try:
                    nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                    by_handle.append((handle, index))
                except Exception as exc:  # noqa: BLE001 (not supported: e.g. some vGPUs)
                    log.info("XID events are not available for device %d: %s", index, exc)
        except Exception as exc:  # noqa: BLE001
            log.info("XID events are not available: %s", exc)
            return
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(events, 1000)
            except Exception:  # noqa: BLE001 (NVML_ERROR_TIMEOUT every second, or a failure)
                continue
            xid = int(getattr(data, "eventData", 0))
            for handle, index in by_handle:
                if _same_handle(getattr(data, "device", None), handle):
                    self._events.put((index, xid))
        try:
            nvml.nvmlEventSetFree(events)
        except Exception:  # noqa: BLE001
            pass

    def _nvml_figures(self, handle: Any) -> tuple[dict[str, Any], list[str], bool]:
        """(figures, what was not available, whether the GPU is lost)."""
        nvml = self._nvml
        figures: dict[str, Any] = {}
        unavailable: list[str] = []
        lost = False

        def read(name: str, call: Any) -> None:
            nonlocal lost
            try:
                figures[name] = call()
            except Exception as exc:  # noqa: BLE001 (NVMLError_NotSupported, ...)
                figures[name] = None
                unavailable.append(name)
                if "lost" in str(exc).lower():
                    lost = True

        read("temperature_c", lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        read("temperature_limit_c", lambda: self._temperature_limit(handle))
        read("fan_ratio", lambda: nvml.nvmlDeviceGetFanSpeed(handle) / 100.0)
        read("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        read("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
        read("sm_clock_hz", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM) * 1e6)
        read("memory_clock_hz", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM) * 1e6)
        rates: dict[str, Any] = {}

        def utilization() -> float:
            rates["utilization"] = nvml.nvmlDeviceGetUtilizationRates(handle)
            return float(rates["utilization"].gpu) / 100.0

        def memory_used() -> int:
            rates["memory"] = nvml.nvmlDeviceGetMemoryInfo(handle)
            return int(rates["memory"].used)

        read("utilization", utilization)
        read("memory_utilization", lambda: float(rates["utilization"].memory) / 100.0)
        read("memory_used_bytes", memory_used)
        read("memory_total_bytes", lambda: int(rates["memory"].total))
        read("ecc_corrected", lambda: int(nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC)))
        read("ecc_uncorrected", lambda: int(nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)))
        read("energy_j", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0)
        read("throttle_reasons", lambda: _throttle_names(_throttle_mask(nvml, handle)))
        try:
            remapped = nvml.nvmlDeviceGetRemappedRows(handle)
            figures["row_remap_failure"] = bool(remapped[3])
        except Exception:  # noqa: BLE001 (pre-Ampere, or not supported)
            figures["row_remap_failure"] = None
        return figures, unavailable, lost

    def _temperature_limit(self, handle: Any) -> float:
        if self.max_temperature_c is not None:
            return float(self.max_temperature_c)
        try:
            slowdown = self._nvml.nvmlDeviceGetTemperatureThreshold(handle, self._nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            return float(slowdown) - TEMPERATURE_HYSTERESIS_C
        except Exception:  # noqa: BLE001
            return DEFAULT_MAX_TEMPERATURE_C

    # ------------------------------------------------------------------------------------------
    # A sample
    # ------------------------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """Read everything once, decide health, publish (and return) the snapshot."""
        try:
            snapshot = self._sample()
        except Exception as exc:  # noqa: BLE001 (never let the sampler die: the last snapshot stays)
            log.error("health sampling failed", exc_info=exc)
            return self.latest
        self.latest = snapshot
        self.samples += 1
        return snapshot

    def _sample(self) -> dict[str, Any]:
        while True:
            try:
                index, xid = self._events.get_nowait()
            except queue.Empty:
                break
            counts = self._xids.setdefault(index, {})
            counts[xid] = counts.get(xid, 0) + 1
            log.error("device %d reported XID %d (%s)", index, xid, XID_MEANINGS.get(xid, "see NVIDIA's XID catalogue"),
                      extra={"event": "device_xid", "device": index, "xid": xid})
        injected = self._injected()
        host = host_figures(self)
        rows: dict[int, dict[str, Any]] = {}
        for ref in self.devices:
            handle = self._handles.get(ref.index)
            if handle is not None:
                figures, unavailable, lost = self._nvml_figures(handle)
                source = "nvml"
            else:
                figures = dict.fromkeys(GPU_FIELDS)
                figures["row_remap_failure"] = None
                unavailable, lost = list(GPU_FIELDS), False
                source = "host" if ref.spec == "cpu" else "none"
                if ref.spec == "cpu":
                    figures["temperature_c"] = host.get("temperature_c")
                    figures["temperature_limit_c"] = (self.max_temperature_c if self.max_temperature_c is not None
                                                      else DEFAULT_MAX_TEMPERATURE_C)
                    figures["utilization"] = host.get("cpu_utilization")
                    unavailable = [name for name in GPU_FIELDS if figures.get(name) is None]
            xids = dict(self._xids.get(ref.index, {}))
            extra = injected.get(str(ref.index)) or {}
            for name, value in extra.items():
                if name == "xid":
                    for xid in value if isinstance(value, list) else [value]:
                        xids[int(xid)] = xids.get(int(xid), 0) + 1
                elif name in figures or name in ("lost", "reason"):
                    figures[name] = value
                    if name in unavailable:
                        unavailable.remove(name)
            reasons = self._reasons(ref.index, figures, xids, lost or bool(figures.pop("lost", False)))
            if figures.get("reason"):
                reasons.append({"kind": "injected", "message": str(figures.pop("reason"))})
            figures.pop("reason", None)
            rows[ref.index] = {
                "index": ref.index, "uuid": ref.uuid, "source": source, "healthy": not reasons, "reasons": reasons,
                **figures, "xid_events": {str(xid): count for xid, count in sorted(xids.items())},
                "unavailable": unavailable,
                "unavailable_because": (self._nvml_error or "not reported by this GPU") if unavailable else None,
            }
        return {"time": time.time(), "source": "nvml" if self._handles else "host", "host": host, "devices": rows,
                "nvml": self._nvml_error or "available"}

    def _reasons(self, index: int, figures: dict[str, Any], xids: dict[int, int], lost: bool) -> list[dict[str, str]]:
        reasons: list[dict[str, str]] = []
        if lost:
            reasons.append({"kind": "lost", "message": "NVML reports the GPU lost (fallen off the bus or reset)"})
        if (figures.get("ecc_uncorrected") or 0) > 0:
            reasons.append({"kind": "ecc", "message": f"{figures['ecc_uncorrected']} uncorrectable ECC error(s) since "
                                                     "the driver loaded"})
        if figures.get("row_remap_failure"):
            reasons.append({"kind": "row_remap", "message": "a memory row remapping failed"})
        fatal = sorted(xid for xid in xids if xid not in APPLICATION_XIDS)
        if fatal:
            named = ", ".join(f"XID {xid} ({XID_MEANINGS.get(xid, 'see NVIDIA’s XID catalogue')})" for xid in fatal)
            reasons.append({"kind": "xid", "message": f"{named}; until the daemon restarts"})
        temperature, limit = figures.get("temperature_c"), figures.get("temperature_limit_c")
        if isinstance(temperature, (int, float)) and isinstance(limit, (int, float)):
            hot = temperature >= limit or (index in self._hot and temperature > limit - TEMPERATURE_HYSTERESIS_C)
            if hot:
                self._hot.add(index)
                reasons.append({"kind": "temperature", "message": f"{temperature:.0f} °C, at or above the limit of "
                                                                  f"{limit:.0f} °C (--health-max-temperature)"})
            else:
                self._hot.discard(index)
        return reasons

    def _injected(self) -> dict[str, Any]:
        """Figures a test put in ``--health-inject FILE`` (tests only): {device index: {name: value}}."""
        if not self.inject_path:
            return {}
        try:
            with open(self.inject_path) as file:
                data = json.load(file)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}


def _same_handle(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b) or (getattr(a, "value", None) is not None and a.value == getattr(b, "value", None))
    except Exception:  # noqa: BLE001
        return False


def _throttle_mask(nvml: Any, handle: Any) -> int:
    getter = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(getter(handle))


def _throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


# ----------------------------------------------------------------------------------------------
# The host
# ----------------------------------------------------------------------------------------------
def host_figures(sampler: HealthSampler | None = None) -> dict[str, Any]:
    """What the host tells without NVML: load, CPU utilization since the last sample, memory, the
    hottest thermal zone. A figure the host does not have is None."""
    figures: dict[str, Any] = {"load1": None, "cpu_utilization": None, "memory_available_bytes": None,
                               "memory_total_bytes": None, "temperature_c": None, "cpus": os.cpu_count()}
    try:
        figures["load1"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        with open("/proc/stat") as stat:
            parts = [int(value) for value in stat.readline().split()[1:]]
        idle, total = parts[3] + (parts[4] if len(parts) > 4 else 0), sum(parts[:8])
        previous = sampler._cpu_times if sampler is not None else None
        if previous is None or total <= previous[1]:
            previous = (0, 0)  # (the first sample: since boot)
        if total > previous[1]:
            busy = 1.0 - (idle - previous[0]) / (total - previous[1])
            figures["cpu_utilization"] = min(1.0, max(0.0, busy))
        if sampler is not None:
            sampler._cpu_times = (idle, total)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    figures["memory_total_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("MemAvailable:"):
                    figures["memory_available_bytes"] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    hottest = None
    try:
        zones = os.listdir("/sys/class/thermal")
    except OSError:
        zones = []
    for zone in zones:
        if not zone.startswith("thermal_zone"):
            continue
        try:
            with open(f"/sys/class/thermal/{zone}/temp") as file:
                value = int(file.read().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if 0 < value < 150 and (hottest is None or value > hottest):
            hottest = value
    figures["temperature_c"] = hottest
    return figures
