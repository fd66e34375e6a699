"""What a new user tripped on (issue 25): one request's failure stays its own, checks come
before the work, servers end and log like Unix tools, messages name the caller's fields."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import tiny_artifacts

from nemocompile.runtime import Runtime, ServerError
from nemocompile.runtime.policy import CostTableError
from nemocompile.runtime.serve.stdio import error_type


@pytest.fixture(scope="module")
def artifact():
    return tiny_artifacts.lora_batch2()[1]


@pytest.fixture(scope="module")
def rt(artifact):
    with Runtime.load(artifact, threads=1) as runtime:
        yield runtime


# ---- 1: a malformed cost table, and one row's failure --------------------------------------
def test_a_malformed_costs_json_is_refused_when_the_runtime_loads(artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    (art / "costs.json").write_text("{not json")
    with pytest.raises(CostTableError, match="costs.json: not readable JSON.*nemocompile calibrate") as e:
        Runtime.load(art, threads=1)
    assert "\n" not in str(e.value)
    with Runtime.load(art, threads=1, costs=False) as runtime:  # calibrate replaces the table
        assert "auto" in runtime.modes


def test_a_failing_scheduler_ends_its_own_request_only(rt, monkeypatch):
    """The policy raising for one row fails that request with a server-side error; the request
    decoding beside it finishes with its own tokens."""
    alone = rt.generate([5, 9, 11], mode="ar", max_new_tokens=20, eos=-1).tokens

    def broken(row):
        raise CostTableError("the cost table has no time for graph draft@8")

    monkeypatch.setattr(rt.engine, "choose_mode", broken)
    other = rt.submit([5, 9, 11], mode="ar", max_new_tokens=20, eos=-1)
    failing = rt.submit([7, 7, 7], mode="auto", max_new_tokens=20, eos=-1)
    with pytest.raises(ServerError, match="no time for graph draft@8") as e:
        failing.result()
    assert error_type(e.value) == "server_error"
    assert other.result()[0].tokens == alone
    monkeypatch.undo()
    assert rt.generate([5, 9, 11], mode="ar", max_new_tokens=20, eos=-1).tokens == alone  # still serving


# ---- 3: two exports to one --out ------------------------------------------------------------
def test_an_export_that_finishes_second_does_not_replace_the_first(tmp_path):
    """Another export writes --out while this one traces: this one fails at the rename
    ("exists ... --force") and leaves the other's artifact as it was."""
    from conftest import make_model

    from nemocompile.graphs.export import ExportError, export_artifact

    out = tmp_path / "art"
    model = make_model()

    def other_export_finishes(msg: str) -> None:
        if "tracing" in msg and not out.exists():
            out.mkdir()
            (out / "manifest.json").write_text("{\"the\": \"first export\"}")

    with pytest.raises(ExportError, match="exists.*--force"):
        export_artifact(model, out, modes=["ar"], max_seq_len=32, prefill_length=8, progress=other_export_finishes)
    assert json.loads((out / "manifest.json").read_text()) == {"the": "first export"}
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no partial directory left behind


# ---- 4: every argument, artifact and output path before the work -----------------------------
def _no_work(monkeypatch):
    from nemocompile.runtime import runtime as runtime_module

    def refuse(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(runtime_module.Runtime, "load", refuse)


def test_bench_refuses_a_plot_file_matplotlib_cannot_write_before_benchmarking(artifact, tmp_path, capsys,
                                                                                monkeypatch):
    from nemocompile.cli import main

    _no_work(monkeypatch)
    rc = main(["bench", "--artifact", str(artifact), "--plot", str(tmp_path / "out.txt"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write .txt" in err and ".png" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bench_checks_every_artifact_for_the_modes_before_the_first_runs(artifact, tmp_path, capsys, monkeypatch):
    from nemocompile.cli import main
    from nemocompile.artifact.manifest import Manifest

    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    Manifest.load(other).for_modes(["ar", "linear-spec"]).save(other)  # no diffusion graphs
    _no_work(monkeypatch)
    rc = main(["bench", "--artifact", str(artifact), "--artifact", str(other), "--modes", "diffusion", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(other) in err and "no diffusion graphs" in err, err


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_export_refuses_an_out_in_proc_where_no_folder_can_be_made(capsys):
    from nemocompile.cli import main

    rc = main(["export", "--out", "/proc/x", "--mode", "ar"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot create a folder in /proc" in err and "Traceback" not in err, err
    from nemocompile.commands.common import check_output_file
    from nemocompile.errors import NemocompileError

    with pytest.raises(NemocompileError, match="--json /proc/x.json: cannot create a file in /proc"):
        check_output_file("/proc/x.json", "--json")


# ---- 5: server logs and signals ----------------------------------------------------------------
def test_http_server_is_quiet_on_a_client_leaving_mid_body_and_ends_on_sigterm_like_sigint(artifact):
    """A client that closes while sending its body leaves no traceback in the log; SIGTERM ends
    the server as Ctrl-C does: "interrupted", status 130."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("uvicorn")
    proc = subprocess.Popen([sys.executable, "-m", "nemocompile", "serve", "--http", "--artifact", str(artifact),
                             "--port", "0", "--threads", "1", "--modes", "ar"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not seen or "listening on " not in seen[-1]:
            line = proc.stderr.readline()
            assert line, "the server did not start:\n" + "".join(seen)
            seen.append(line)
        port = int(seen[-1].rsplit(":", 1)[1])
        for _ in range(100):  # the address is printed just before uvicorn listens
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        with s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.5)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err and "ClientDisconnect" not in err, err
    assert proc.returncode == 130 and err.strip().endswith("interrupted"), (proc.returncode, err)


def test_serve_http_names_the_host_when_it_is_not_an_address(artifact, capsys):
    pytest.importorskip("uvicorn")
    from nemocompile.cli import main

    rc = main(["serve", "--http", "--artifact", str(artifact), "--modes", "ar", "--host", "256.1.1.1", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--host" in err and "--port" not in err, err


# ---- 6: stdio ids ---------------------------------------------------------------------------------
def test_stdio_refuses_an_id_in_flight_and_answers_a_cancel_of_an_unknown_id(rt):
    import io

    from nemocompile.runtime.serve.stdio import serve_stdio

    lines = [{"id": 1, "prompt": [5, 9, 11], "max_new_tokens": 40, "eos": -1},
             {"id": 1, "prompt": [7, 7], "max_new_tokens": 2},
             {"cancel": 99}]
    out = io.StringIO()
    assert serve_stdio(rt, stdin=io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines)),
                       stdout=out) == 0
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    finals = [r for r in replies if r.get("done")]
    assert len(finals) == 2 and all(r["id"] == 1 for r in finals)
    refused = [r for r in finals if "error" in r]
    assert len(refused) == 1 and refused[0]["error"]["type"] == "duplicate_id", finals
    assert [len(r["tokens"]) for r in finals if "tokens" in r] == [40]  # the first one ran to its end
    answers = [r for r in replies if "cancel" in r]
    assert answers == [{"cancel": 99, "error": {"type": "unknown_id", "message": answers[0]["error"]["message"]}}]
    assert "99" in answers[0]["error"]["message"]


# ---- 7: messages ---------------------------------------------------------------------------------
def test_capacity_errors_say_the_prompt_and_its_padding_and_the_callers_field_name(rt):
    from nemocompile.text.request import RequestError

    with pytest.raises(RequestError) as e:  # capacity 48, prefill chunk 16, block 8
        rt.submit([5], mode="quadratic-spec", max_new_tokens=30)
    assert "prompt (1 tokens, padded to a prefill chunk of 16) + max_new_tokens (30)" in str(e.value), e.value
    with pytest.raises(RequestError) as e:  # over HTTP the field is max_tokens
        rt.submit([5, 6, 7], mode="ar", max_new_tokens=60, names={"max_new_tokens": "max_tokens"})
    assert "max_new_tokens" not in str(e.value) and "lower max_tokens" in str(e.value) and e.value.param == "max_tokens"


# ---- 8: --verify ----------------------------------------------------------------------------------
def test_verify_refuses_a_same_size_damaged_artifact_that_a_plain_load_would_run(artifact, tmp_path, capsys):
    from nemocompile.artifact.files import ArtifactDamagedError
    from nemocompile.cli import main
    from nemocompile.artifact.manifest import Manifest

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    weights = art / Manifest.load(art).weights_file
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a copy that went wrong: same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactDamagedError, match="SHA-256 differs"):
        Runtime.load(art, threads=1, modes=["ar"], verify=True)
    Runtime.load(art, threads=1, modes=["ar"]).close()  # sizes only: it would run
    rc = main(["run", "--artifact", str(art), "--prompt", "x", "--verify", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "SHA-256 differs" in err and "re-export" in err


# ---- 11: the README against the code ---------------------------------------------------------------
def test_runtime_generate_takes_eos_token_id_as_the_readme_names_it(rt):
    from nemocompile.text.request import RequestError

    by_eos = rt.generate([5, 9, 11], max_new_tokens=6, eos=-1).tokens
    assert rt.generate([5, 9, 11], max_new_tokens=6, eos_token_id=-1).tokens == by_eos
    assert rt.generate([5, 9, 11], max_new_tokens=6, eos_token_id=[by_eos[2]]).tokens == by_eos[:3]  # a list too
    with pytest.raises(RequestError, match="give one"):
        rt.submit([5, 9, 11], eos=-1, eos_token_id=3)


def test_the_readmes_stdio_example_error_types_are_the_servers(rt):
    import io
    import re
    from pathlib import Path

    from nemocompile.runtime.serve.stdio import serve_stdio

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### The stdio protocol", 1)[1].split("```", 2)[1]
    sent = [line[2:] for line in block.splitlines() if line.startswith("> ")]
    documented = re.findall(r'"type": "(\w+)"', block)
    out = io.StringIO()
    lines = [line for line in sent if '"prompt": "x"' in line or not line.startswith("{")]  # the failing ones
    serve_stdio(rt, stdin=io.BytesIO("".join(line + "\n" for line in lines).encode()), stdout=out)
    got = sorted(json.loads(line)["error"]["type"] for line in out.getvalue().splitlines())
    assert got == sorted(documented) and len(got) == 2, (got, documented)


def test_the_stdio_client_example_offers_every_mode():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "stdio_client.py"
    text = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True).stdout
    for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec", "auto"):
        assert mode in text, text


# ---- 10: pictures and summaries --------------------------------------------------------------------
def test_check_groups_findings_that_differ_only_in_node_names(artifact, capsys, monkeypatch):
    from nemocompile.cli import main
    from nemocompile.passes import check_tensorrt

    alike = [f"MatMulNBits node 'layers.{i}.mlp': custom domain 'com.microsoft' needs a TensorRT plugin"
             for i in range(29)]
    monkeypatch.setattr(check_tensorrt, "lint_file", lambda path: [*alike, "opset 99 is outside the range"])
    assert main(["check", "--artifact", str(artifact)]) == 1
    out = capsys.readouterr().out
    assert "'layers.0.mlp'" in out and "(and 28 more like it)" in out and "'layers.5.mlp'" not in out, out
    assert "31 problem(s)" not in out and "30 problem(s)" in out


def test_bench_plot_has_a_log_rate_axis_a_title_and_no_none_thresholds(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from nemocompile.runtime.bench import modes as bench

    def row(mode, L, t, tps):
        return {"backend": "onnxruntime", "mode": mode, "block_length": L, "threshold": t, "artifact": "arts/tiny",
                "tokens_per_second": tps, "tokens_per_forward": 2.0}

    report = {"results": [row("ar", None, None, 150.0), row("diffusion", 32, None, 40.0),
                          row("linear-spec", 32, 0.0, 90.0), row("quadratic-spec", 32, None, 6.0)],
              "settings": {"artifacts": ["arts/tiny"], "backends": ["onnxruntime"], "prompts": 4,
                           "max_new_tokens": 32, "threads": 1, "modes": None}}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    bench.plot(report, tmp_path / "b.png")
    fig = figures[0]
    rate = fig.axes[0]
    assert rate.get_yscale() == "log"
    labels = [t.get_text() for t in rate.get_xticklabels()]
    assert not any("None" in lab for lab in labels) and "diffusion B=32 fixed steps" in labels, labels
    title = fig._suptitle.get_text()
    assert "tiny" in title and "4 prompts x 32 new tokens" in title and "1 thread" in title, title


# ---- 9: silence ------------------------------------------------------------------------------------
def test_a_long_eager_generation_says_it_is_alive_with_its_forward_count(tiny_model):
    import time

    import nemocompile
    from nemocompile.progress import Heartbeat, counting_forwards

    said: list[str] = []
    count, unhook = counting_forwards(tiny_model)
    with Heartbeat("generating (linear-spec)", say=said.append, every_s=0.05, after_s=0.05, count=count):
        result = nemocompile.generate(tiny_model, [5, 9, 11], mode="linear-spec", max_new_tokens=8, eos_token_id=-1)
        time.sleep(0.2)
    unhook()
    assert said and said[-1].startswith("generating (linear-spec): ")
    assert said[-1].endswith(f"{result.stats.forwards} forwards"), (said, result.stats.forwards)
    with Heartbeat("quick", say=said.append, after_s=5):  # quick work prints nothing
        pass
    assert not any(s.startswith("quick") for s in said)


def test_the_default_bench_is_the_quick_one_and_the_full_one_is_two_flags(artifact, tmp_path, monkeypatch, capsys):
    from nemocompile.cli import main
    from nemocompile.errors import NemocompileError
    from nemocompile.runtime.bench import modes as bench

    seen = []

    def capture(artifacts, prompts, max_new_tokens, **kw):
        seen.append((len(prompts), max_new_tokens))
        raise NemocompileError("captured")

    monkeypatch.setattr(bench, "run_bench", capture)
    main(["bench", "--artifact", str(artifact)])
    main(["bench", "--artifact", str(artifact), "--limit", "24", "--max-new-tokens", "64"])
    own = tmp_path / "p.txt"
    own.write_text("".join(f"line {i}\n" for i in range(6)))
    main(["bench", "--artifact", str(artifact), "--prompts", str(own)])
    assert seen == [(4, 32), (24, 64), (6, 32)]
