"""Build hook for ppu-client: generates the ppu.v1 gRPC stubs when the package is built.

The stubs are never committed: `build_py` runs grpcio-tools' protoc over the repository's
`proto/ppu/v1/*.proto` (two levels up, so `pip install ./clients/python` works from a checkout)
or over the copy an sdist carries in `proto/` (added by the `sdist` override below), and writes
them into the package `ppu_client._generated`. Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_SUBDIR = Path("ppu") / "v1"
# An sdist carries its own copy first; a checkout has the protos at the repository root.
PROTO_ROOTS = (HERE / "proto", HERE.parent.parent / "proto")
GENERATED = Path("ppu_client") / "_generated"


def find_proto_root() -> Path:
    """The directory holding `ppu/v1/*.proto`, or a clear build failure."""
    for root in PROTO_ROOTS:
        if any((root / PROTO_SUBDIR).glob("*.proto")):
            return root
    tried = ", ".join(str(r / PROTO_SUBDIR) for r in PROTO_ROOTS)
    raise SystemExit(
        "ppu-client: cannot find the ppu.v1 .proto files (looked in "
        f"{tried}). Build from a ppu checkout (`pip install ./clients/python` from the "
        "repository root) or from an sdist made there (`python -m build --sdist "
        "clients/python`), which carries a copy of the protos."
    )


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc over proto/ppu/v1 and writes the stubs into `out_dir` as one package.

    protoc emits absolute imports (`from ppu.v1 import devices_pb2`); they are rewritten to
    relative ones so the stubs live inside `ppu_client` and cannot clash with another `ppu`.
    """
    import grpc_tools
    from grpc_tools import protoc

    root = find_proto_root()
    protos = sorted((root / PROTO_SUBDIR).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"ppu-client: protoc failed on {root / PROTO_SUBDIR}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(tmp) / PROTO_SUBDIR).iterdir()):
            text = re.sub(r"^from ppu\.v1 import ", "from . import ", f.read_text(), flags=re.M)
            dest = out_dir / f.name
            dest.write_text(text)
            written.append(dest)
    init = out_dir / "__init__.py"
    init.write_text(
        '"""ppu.v1 messages and service stubs, generated from proto/ppu/v1 when ppu-client '
        'was built. Do not edit."""\n'
    )
    written.append(init)
    return written


def runtime_requirements() -> list[str]:
    """grpcio and protobuf at least as new as the generator, as the stubs check at import."""
    try:
        tools = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return ["grpcio>=1.66", "protobuf>=5.27"]
    reqs = [f"grpcio>={tools}"]
    for r in metadata.requires("grpcio-tools") or []:
        if re.match(r"protobuf\b", r):
            reqs.append(r.split(";")[0].strip())
    return reqs


class BuildPyWithStubs(build_py):
    """`build_py` that also generates the stubs into the build tree (or the source tree for an
    editable install, where they are git-ignored)."""

    def run(self) -> None:
        super().run()
        base = HERE / "src" if getattr(self, "editable_mode", False) else Path(self.build_lib)
        self._stubs = generate(base / GENERATED)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [str(p) for p in getattr(self, "_stubs", [])]


class SdistWithProtos(sdist):
    """`sdist` that carries a copy of proto/ppu/v1, so the sdist builds outside the checkout."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        src = find_proto_root() / PROTO_SUBDIR
        dest = Path(base_dir) / "proto" / PROTO_SUBDIR
        dest.mkdir(parents=True, exist_ok=True)
        for p in sorted(src.glob("*.proto")):
            shutil.copy2(p, dest / p.name)


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos},
)
