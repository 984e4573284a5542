"""libremote: one distribution with the client (``libremote``), the wire every peer speaks
(``libremote_wire``, torch-free), the daemon (``libremote_server``) and the shims
(``libremote.shims``). The repository keeps the wire in libremote/wire/ and the daemon in server/;
they install as packages of their own, so that importing them never runs the client's
``libremote/__init__.py`` (which switches torch's ``cuda`` to the remote device). In a checkout,
the symbolic links libremote_wire and libremote_server at the top make the same names importable."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
#: Installed at the top of site-packages: the startup hook for LIBREMOTE_SERVER opt-in.
TOP_LEVEL_SHIM_FILES = ("shims/libremote-autostart.pth", "shims/_libremote_autostart.py")


class BuildPyWithStartupHook(build_py):
    """Also place the .pth startup hook and its tiny module at the root of the build."""

    def run(self) -> None:
        super().run()
        for relative in TOP_LEVEL_SHIM_FILES:
            self.copy_file(os.path.join(HERE, relative), os.path.join(self.build_lib, os.path.basename(relative)))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return list(super().get_outputs(include_bytecode)) + [
            os.path.join(self.build_lib, os.path.basename(relative)) for relative in TOP_LEVEL_SHIM_FILES
        ]


def read_version() -> str:
    with open(os.path.join(HERE, "libremote", "wire", "__init__.py")) as source:
        for line in source:
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no __version__ in libremote/wire/__init__.py")


setup(
    name="libremote",
    version=read_version(),
    description="Use GPUs in other servers from PyTorch programs on CPU-only hosts; share GPUs among many clients.",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["libremote", "libremote.client", "libremote_wire", "libremote_wire.pool", "libremote_server", "libremote_server.worker",
              "libremote_server.telemetry", "libremote.shims"],
    package_dir={"libremote_wire": "libremote/wire", "libremote_server": "server",
                 "libremote_server.worker": "server/worker", "libremote_server.telemetry": "server/telemetry",
                 "libremote.shims": "shims"},
    package_data={"libremote_server.telemetry": ["dashboard.html"]},
    # The torch releases CI tests (requirements-dev.txt pins 2.13.0): the client patches torch's
    # names and relies on its PrivateUse1 hooks, so an untested release is not promised. (Daemons
    # have also run from a checkout on the GPU images' torch 2.11; the wire carries ops by schema
    # name, so client and daemon may differ: tests/test_version_skew.py.)
    install_requires=["torch>=2.13,<2.14", "pyzmq>=25", "msgpack>=1.0", "numpy", "cffi>=1.15"],
    # metrics: the daemon's Prometheus endpoint and dashboard (--metrics-listen) and GPU health
    # through NVML; watch: `libremote status --watch` drawn with rich (plain text without it);
    # pool: one pool across many servers on etcd (docs/POOL.md), through etcd's JSON gateway.
    extras_require={"test": ["pytest>=7"], "multidevice": ["ninja"], "pool": ["etcd3gw>=2.4"],
                    "metrics": ["prometheus-client>=0.20", "nvidia-ml-py>=12"], "watch": ["rich>=12"]},
    entry_points={
        "console_scripts": [
            "libremote-server = libremote_server.cli:main",
            "libremote = libremote_wire.cli:main",
        ]
    },
    cmdclass={"build_py": BuildPyWithStartupHook},
)
