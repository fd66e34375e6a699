"""`nemocompile check`: lint an artifact's graphs against TensorRT's ONNX parser."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="check an exported artifact: ONNX checker, manifest I/O, TensorRT parser lint")
    p.add_argument("--artifact", required=True, metavar="DIR", help="directory written by `nemocompile export`")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import onnx
    import onnx_ir as ir

    from nemocompile.artifact.files import damaged_files
    from nemocompile.artifact.manifest import Manifest
    from ..passes.base import PassContext, PassError
    from ..passes.check_io import check_io
    from ..passes.check_onnx import check_onnx
    from ..passes.check_tensorrt import OPSET_RANGE, TENSORRT_VERSION, group_findings, lint_file

    manifest = Manifest.load(args.artifact)  # validates the manifest itself
    # every file's size and SHA-256 against the manifest's record: a damaged file is reported, never parsed
    damaged = damaged_files(args.artifact, manifest, hashes=True)
    report = {}
    for g in manifest.graphs:
        path = Path(args.artifact) / g.file
        findings = []
        if any(d.startswith(f"{path}:") for d in damaged):
            findings.append(f"{g.file}: damaged (see files above); not parsed")
        elif manifest.weights_file and any(d.startswith(f"{Path(args.artifact) / manifest.weights_file}:")
                                           for d in damaged):
            findings.append(f"{g.file}: its weights file is damaged; not parsed")
        else:
            for check in (lambda: check_onnx(path),  # the ONNX checker and strict shape inference
                          lambda: check_io(ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False)),
                                           PassContext(g.step, g.inputs, g.outputs))):  # the manifest's I/O
                try:
                    check()
                except PassError as e:
                    findings.append(str(e))
                except Exception as e:  # protobuf/onnx on a file damaged in a way no record caught
                    findings.append(f"{g.file}: cannot be read ({' '.join(str(e).split())[:200]}); re-export it")
                    break
            else:
                findings += lint_file(path)
        report[g.step] = findings
    ok = not damaged and not any(report.values())
    if args.json:
        print(json.dumps({"ok": ok, "tensorrt_version": TENSORRT_VERSION, "damaged_files": damaged,
                          "graphs": report}, indent=2))
    else:
        for d in damaged:
            print(f"damaged: {d}")
        print(f"TensorRT {TENSORRT_VERSION} ONNX-parser lint (opsets {OPSET_RANGE[0]}-{OPSET_RANGE[1]}), "
              f"artifact opset {manifest.opset}")
        for step, findings in report.items():
            print(f"  {step:<8} {'ok' if not findings else f'{len(findings)} problem(s)'}")
            for f in group_findings(findings):  # --json keeps every line
                print(f"           - {f}")
        print("every graph would parse" if ok else
              "the artifact is damaged: re-export it" if damaged else "TensorRT would reject the graphs above")
    return 0 if ok else 1
