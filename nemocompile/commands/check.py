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

    from ..manifest import Manifest
    from ..passes.base import PassContext, PassError
    from ..passes.check_io import check_io
    from ..passes.check_onnx import check_onnx
    from ..passes.check_tensorrt import OPSET_RANGE, TENSORRT_VERSION, lint_file

    manifest = Manifest.load(args.artifact)  # validates the manifest itself
    report = {}
    for g in manifest.graphs:
        path = Path(args.artifact) / g.file
        findings = []
        if not path.is_file():
            findings.append(f"{g.file}: missing from the artifact; re-export it")
        else:
            for check in (lambda: check_onnx(path),  # the ONNX checker and strict shape inference
                          lambda: check_io(ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False)),
                                           PassContext(g.step, g.inputs, g.outputs))):  # the manifest's I/O
                try:
                    check()
                except PassError as e:
                    findings.append(str(e))
            findings += lint_file(path)
        report[g.step] = findings
    ok = not any(report.values())
    if args.json:
        print(json.dumps({"ok": ok, "tensorrt_version": TENSORRT_VERSION, "graphs": report}, indent=2))
    else:
        print(f"TensorRT {TENSORRT_VERSION} ONNX-parser lint (opsets {OPSET_RANGE[0]}-{OPSET_RANGE[1]}), "
              f"artifact opset {manifest.opset}")
        for step, findings in report.items():
            print(f"  {step:<8} {'ok' if not findings else f'{len(findings)} problem(s)'}")
            for f in findings:
                print(f"           - {f}")
        print("every graph would parse" if ok else "TensorRT would reject the graphs above")
    return 0 if ok else 1
