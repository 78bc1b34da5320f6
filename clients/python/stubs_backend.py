"""The client-only distribution's build: setuptools, after laying out `src/` from the repository.

`src/` gets the swarm.v1 stubs, generated from protos/ with grpcio-tools and mypy-protobuf (the
build requirements, pinned as in the dev extra, so the code is the same as `make protos` makes),
and the client library's modules from clients/swarm_client. Nothing else of the repository goes in.
Built from an sdist, where protos/ is not at hand, the `src/` the sdist carries is used as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from setuptools import build_meta

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROTOS = REPO / "protos"
LIBRARY = REPO / "clients" / "swarm_client"
# The library's modules all go in, but for the terminal's: the CLI, its views, `swarm up` and
# `swarm certs` need rich, cryptography and the services, which a client alone does not carry.
TERMINAL_FILES = frozenset({"cli.py", "_view.py", "_terminal.py", "_local_stack.py", "_certs.py"})
SRC = HERE / "src"


def _plugin(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is missing from the build environment (it comes with mypy-protobuf)")
    return found


def _lay_out() -> None:
    if not PROTOS.is_dir():
        return  # building from an sdist: src/ came with it
    import grpc_tools
    from grpc_tools import protoc

    # What `python -m grpc_tools.protoc` adds by itself: the well-known types (Timestamp).
    well_known = Path(grpc_tools.__file__).parent / "_proto"

    shutil.rmtree(SRC, ignore_errors=True)
    stubs = SRC / "swarm" / "v1"
    stubs.mkdir(parents=True)
    protos = sorted(str(path.relative_to(PROTOS)) for path in (PROTOS / "swarm" / "v1").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={SRC}",
        f"--grpc_python_out={SRC}",
        f"--mypy_out={SRC}",
        f"--mypy_grpc_out={SRC}",
        *[str(PROTOS / proto) for proto in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(protos)}")
    for marker in (SRC / "swarm" / "__init__.py", stubs / "__init__.py", SRC / "swarm" / "py.typed"):
        marker.touch()
    (SRC / "swarm_client").mkdir()
    for path in sorted(LIBRARY.iterdir()):
        if path.is_file() and path.suffix in (".py", ".typed") and path.name not in TERMINAL_FILES:
            shutil.copy2(path, SRC / "swarm_client" / path.name)


# setuptools reads the packages in every hook, so each one lays out src/ first.
def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    _lay_out()
    return build_meta.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings: dict[str, Any] | None = None) -> list[str]:
    _lay_out()
    return build_meta.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: dict[str, Any] | None = None
) -> str:
    _lay_out()
    return build_meta.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(
    wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    _lay_out()
    return build_meta.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    _lay_out()
    return build_meta.build_sdist(sdist_directory, config_settings)
