"""A C++ device guard for the ``remote`` backend, for clients that use several remote devices.

Layer 1, the session: :mod:`.registration` installs it, :mod:`.runtime` reads how many devices
it reports.

torch's pure-Python PrivateUse1 backend registers a device guard whose ``deviceCount()`` is fixed
at 1 (``PythonDeviceGuard`` in torch/csrc/acc/Module.cpp, torch 2.13). The autograd engine sizes
its per-device queues from it, so backward through a tensor on ``remote:1`` trips an internal
assert. This module compiles (once, cached by torch under ~/.cache/torch_extensions) a small guard
that reports the real count and tracks the current device per thread, and registers it before
the Python one. It needs a C++ compiler on the client, and only when ``LIBREMOTE_DEVICES`` > 1.
"""

from __future__ import annotations

import os
import time

from . import warning_location

_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/Stream.h>

namespace {
thread_local c10::DeviceIndex current_index = 0;
c10::DeviceIndex device_total = 1;

c10::DeviceIndex index_of(c10::Device device) { return device.index() < 0 ? 0 : device.index(); }

struct RemoteDeviceGuard final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::PrivateUse1; }
  c10::Device exchangeDevice(c10::Device device) const override {
    auto previous = getDevice();
    current_index = index_of(device);
    return previous;
  }
  c10::Device getDevice() const override { return c10::Device(c10::DeviceType::PrivateUse1, current_index); }
  void setDevice(c10::Device device) const override { current_index = index_of(device); }
  void uncheckedSetDevice(c10::Device device) const noexcept override { current_index = index_of(device); }
  // Streams and events live on the daemon; on the client they are placeholders.
  c10::Stream getStream(c10::Device device) const noexcept override { return c10::Stream(c10::Stream::DEFAULT, device); }
  c10::Stream getNewStream(c10::Device device, int priority = 0) const override {
    (void)priority;
    return c10::Stream(c10::Stream::DEFAULT, device);
  }
  c10::Stream exchangeStream(c10::Stream stream) const noexcept override {
    return c10::Stream(c10::Stream::DEFAULT, stream.device());
  }
  c10::DeviceIndex deviceCount() const noexcept override { return device_total; }
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
};
}  // namespace

bool register_guard(int64_t count) {
  if (c10::impl::hasDeviceGuardImpl(c10::DeviceType::PrivateUse1)) return false;
  device_total = static_cast<c10::DeviceIndex>(count);
  static RemoteDeviceGuard guard;
  c10::impl::registerDeviceGuard(c10::DeviceType::PrivateUse1, &guard);
  return true;
}
"""

#: Devices the registered guard reports (1: torch's own Python guard is in use).
device_count = 1


def install(count: int) -> None:
    """Build and register the guard for ``count`` devices (before torch's Python guard)."""
    global device_count
    if count <= 1 or device_count >= count:
        return
    from torch.utils.cpp_extension import load_inline

    _clear_stale_build_lock()
    try:
        module = load_inline(name="libremote_device_guard", cpp_sources=_SOURCE, functions=["register_guard"])
    except Exception as exc:  # no compiler, no headers
        raise RuntimeError(
            f"libremote: LIBREMOTE_DEVICES={count} needs a small C++ extension built on this machine "
            f"(a C++ compiler and torch's headers), and building it failed: {exc}"
        ) from exc
    if not module.register_guard(count):
        raise RuntimeError(
            "libremote: a device guard for PrivateUse1 is already registered; set LIBREMOTE_DEVICES "
            "before the first `import libremote` (or `import torch` with the LIBREMOTE_SERVER opt-in)"
        )
    device_count = count


#: A build of this extension takes about a minute; a lock older than this was left by a build
#: that was killed, and torch's file lock would wait for it forever.
_STALE_LOCK_S = 600


def _clear_stale_build_lock() -> None:
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("libremote_device_guard", verbose=False), "lock")
    try:
        age = time.time() - os.stat(lock).st_mtime
    except OSError:
        return  # no lock: nobody is building
    if age > _STALE_LOCK_S:
        warning_location.warn(f"libremote: removing a stale build lock ({lock}, {age / 60:.0f} min old) "
                              "left by a killed build of the device-guard extension", RuntimeWarning)
        try:
            os.remove(lock)
        except OSError:
            pass
