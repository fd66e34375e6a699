"""Drive `nemocompile serve --stdio` from another program: one JSON request per line.

    python examples/stdio_client.py --artifact ARTIFACT_DIR --prompt "def fib(n):" --mode linear-spec

Starts the server as a subprocess, sends one streamed request and one plain
request, prints the streamed text as it arrives and each request's stats,
then closes stdin (EOF), which ends the server cleanly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


class StdioClient:
    """A minimal client: requests go out as lines, responses are matched by id."""

    def __init__(self, artifact: str, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nemocompile", "serve", "--stdio", "--artifact", artifact, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.next_id = 0

    def send(self, **request) -> int:
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"id": self.next_id, **request}) + "\n")
        self.proc.stdin.flush()
        return self.next_id

    def responses(self, rid: int):
        """Yield this request's lines (stream events, then the final line)."""
        for line in self.proc.stdout:
            message = json.loads(line)
            if message["id"] != rid:
                continue  # requests are served in order, so this only skips stale replies
            yield message
            if message.get("done"):
                return
        raise RuntimeError("the server exited before answering")

    def close(self) -> int:
        self.proc.stdin.close()  # EOF: the server finishes and exits
        return self.proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--prompt", default="def fib(n):")
    ap.add_argument("--mode", default="linear-spec", choices=["ar", "diffusion", "linear-spec", "quadratic-spec", "auto"])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    client = StdioClient(args.artifact)
    try:
        rid = client.send(prompt=args.prompt, mode=args.mode, max_new_tokens=args.max_new_tokens, stream=True)
        for message in client.responses(rid):
            if "error" in message:
                print(f"error: {message['error']['message']}", file=sys.stderr)
                return 1
            if message.get("event") == "tokens":
                print(message.get("text", ""), end="", flush=True)
            else:
                s = message["stats"]
                print(f"\n[{s['mode']}: {s['generated_tokens']} tokens in {s['forwards']} forwards, "
                      f"{s['tokens_per_forward']:.2f} tokens/forward]")
        rid = client.send(prompt=args.prompt, mode="ar", max_new_tokens=args.max_new_tokens)
        final = list(client.responses(rid))[-1]
        print(f"[ar: {final['stats']['generated_tokens']} tokens in {final['stats']['forwards']} forwards]")
    finally:
        code = client.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
