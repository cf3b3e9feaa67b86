"""Generates the Python gRPC stubs for ``proto/tandem/v1/*.proto`` into the same folder (the
package ``tandem.proto``), or checks that the committed stubs are current (``--check``).

Stubs are kept in the tree so that machines without grpcio-tools (GPU hosts, images) import them;
they must be generated with grpcio-tools 1.84.0, whose output imports on grpcio >= 1.84 (newer
grpcio-tools emit a runtime-version guard that older grpcio refuses).

    python -m tandem.proto_gen            # regenerate
    python -m tandem.proto_gen --check    # exit 1 if the stubs differ from a fresh generation
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "proto"
PKG = ROOT / "tandem" / "v1"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(PKG.glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *[str(p.relative_to(ROOT)) for p in protos]]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for f in sorted((Path(tmp) / "tandem" / "v1").iterdir()):
            text = f.read_text()
            # protoc writes absolute imports of the proto package path; ours lives at tandem.proto
            text = re.sub(r"^from tandem\.v1 import", "from tandem.proto import", text, flags=re.M)
            dst = out_dir / f.name
            dst.write_text(text)
            written.append(dst)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    if not args.check:
        for f in generate(PKG):
            print(f"wrote {f.relative_to(ROOT.parent)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [f.name for f in generate(Path(tmp))
                 if not (PKG / f.name).is_file() or (PKG / f.name).read_text() != f.read_text()]
    if stale:
        print(f"stale gRPC stubs: {', '.join(stale)}; run `python -m tandem.proto_gen`")
        return 1
    print("gRPC stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
