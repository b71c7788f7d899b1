"""Build hook for ppu-client: generates the ppu.v1 gRPC stubs and the device families' message
stubs when the package is built.

The stubs are never committed: `build_py` runs grpcio-tools' protoc over the repository's
`proto/ppu/v1/*.proto` (two levels up, so `pip install ./clients/python` works from a checkout)
or over the copy an sdist carries in `proto/` (added by the `sdist` override below), and writes
them into the package `ppu_client._generated`. It also compiles every family schema found under
`drivers/src/**/*.proto` (a glob: a new family's folder is picked up without an edit here) with
the schema options `proto/ppu/schema/v1/options.proto`, into `ppu_client._generated.families`,
so results of the families present at build time decode to typed messages with no call to the
daemon. Everything else is declared in pyproject.toml.
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
# The schema options every family file imports, relative to a proto root.
OPTIONS_PROTO = Path("ppu") / "schema" / "v1" / "options.proto"
# Family schemas: the sdist's copy first, then the checkout's drivers (one .proto per family,
# anywhere below, e.g. `furnace/furnace.proto`; protoc names them relative to this root, as the
# daemon's build does, so the file names match the daemon's `GetSchema` descriptors).
FAMILY_ROOTS = (HERE / "families", HERE.parent.parent / "drivers" / "src")
FAMILIES = GENERATED / "families"


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


def find_family_root() -> Path | None:
    """The directory holding the family schemas (`**/*.proto`), or None when there are none
    (the SDK then learns every family from the daemon at run time)."""
    for root in FAMILY_ROOTS:
        if root.is_dir() and any(root.rglob("*.proto")):
            return root
    return None


def family_protos(root: Path) -> list[Path]:
    return sorted(root.rglob("*.proto"))


def generate_families(out_dir: Path, well_known: Path) -> list[Path]:
    """Runs protoc over every family schema plus the options they use, and writes the modules
    into `out_dir` keeping protoc's tree (`furnace/furnace_pb2.py`, `ppu/schema/v1/...`).

    Imports between generated modules (`from ppu.schema.v1 import options_pb2`) are made
    absolute under `ppu_client._generated.families`, so they cannot clash with another `ppu`.
    """
    from grpc_tools import protoc

    proto_root = find_proto_root()
    family_root = find_family_root()
    protos = [proto_root / OPTIONS_PROTO]
    includes = [f"-I{proto_root}"]
    if family_root is not None:
        protos += family_protos(family_root)
        includes.insert(0, f"-I{family_root}")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            *includes,
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"ppu-client: protoc failed on the family schemas in {family_root}")
        tmp_root = Path(tmp)
        generated = sorted(p for p in tmp_root.rglob("*") if p.is_file())
        # Dotted names of the generated packages, e.g. "ppu.schema.v1", "furnace".
        packages = {".".join(p.parent.relative_to(tmp_root).parts) for p in generated}
        prefix = ".".join(FAMILIES.parts)

        def absolute(m: re.Match[str]) -> str:
            pkg = m.group(1)
            return f"from {prefix}.{pkg} import " if pkg in packages else m.group(0)

        for f in generated:
            rel = f.relative_to(tmp_root)
            text = re.sub(r"^from ([\w.]+) import ", absolute, f.read_text(), flags=re.M)
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            written.append(dest)
    # Every directory a package, so the SDK can walk them to load every family.
    dirs = {out_dir}
    for f in written:
        dirs.update(d for d in f.parents if d.is_relative_to(out_dir))
    for d in sorted(dirs):
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


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
    families = out_dir / "families"
    if families.exists():
        shutil.rmtree(families)  # a family removed from the checkout must not linger
    written += generate_families(families, well_known)
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
    """`sdist` that carries a copy of proto/ppu/v1, the schema options and the family schemas,
    so the sdist builds outside the checkout."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = find_proto_root()
        for rel in [p.relative_to(root) for p in sorted((root / PROTO_SUBDIR).glob("*.proto"))] + [
            OPTIONS_PROTO
        ]:
            dest = Path(base_dir) / "proto" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest)
        family_root = find_family_root()
        if family_root is not None:
            for p in family_protos(family_root):
                dest = Path(base_dir) / "families" / p.relative_to(family_root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dest)


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos},
)
