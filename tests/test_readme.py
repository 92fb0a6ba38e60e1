"""The README's set-up and walk-through, run in order as a newcomer copies them.

Every ```bash and ```python block from "## Set-up" up to "## Adapter lifecycle" runs, top to
bottom, in one scratch folder (with `.venv` and `scripts/` linked to this checkout), against the
server its own `hotpeft serve` line starts: shell blocks through bash, Python blocks in one
namespace, statement by statement. A block preceded by `<!-- not run by tests/test_readme.py:
REASON -->` is skipped and must give its reason. A comment `# ... -> EXPECTED` on a command or a
statement is what it prints: its output must contain EXPECTED (`...` matches anything, `<name>` one
word); an expectation ending in "(on the default model)" is checked only on the default model.

The walk-through runs on the tiny test model (`HOTPEFT_MODEL` is set for every command, the
default model's id in Python blocks is the tiny one's, and port 8000 is a free one), so it takes
about a minute. `HOTPEFT_README_MODEL=default` runs it on the embedded default model instead
(tens of minutes on a CPU: it trains three adapters; not run by CI).
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import tiny
from hotpeft.model.source import DEFAULT_MODEL_ID
from hotpeft.server.tools.localserver import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
FIRST, END = "## Set-up", "## Adapter lifecycle"
SKIP = re.compile(r"<!--\s*not run by tests/test_readme\.py:\s*(?P<why>.*?)\s*-->", re.S)
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.S | re.M)
ON_DEFAULT = "(on the default model)"
ON_TINY = os.environ.get("HOTPEFT_README_MODEL", "tiny") != "default"


@dataclass
class Block:
    lang: str
    body: str
    line: int
    skip: str | None


@dataclass
class Step:
    """One command or statement with what the README says it prints."""
    code: str
    expected: list[str] = field(default_factory=list)


def walkthrough_blocks(text: str) -> list[Block]:
    start, end = text.index(FIRST), text.index(END)
    blocks = []
    for m in FENCE.finditer(text, start, end):
        before = text[start:m.start()].rstrip()
        skip = SKIP.search(before[before.rfind("\n\n") + 1:]) if before.endswith("-->") else None
        blocks.append(Block(m["lang"], m["body"], text.count("\n", 0, m.start()) + 1, skip and skip["why"]))
    return blocks


def pattern(expected: str) -> re.Pattern:
    parts = re.split(r"(\.\.\.|<[\w:-]+>)", expected)
    return re.compile("".join(
        ".*?" if p == "..." else r"\S+" if p.startswith("<") else re.escape(p) for p in parts), re.S)


def expectation(comment: str) -> str | None:
    _, arrow, expected = comment.partition("-> ")
    return expected.strip() if arrow else None


def split_comment(line: str, quote: str | None) -> tuple[str | None, str | None]:
    """(the line's comment or None, the quote still open at its end): bash's rules, simplified."""
    prev = " "
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and prev.isspace():
            return line[i + 1:], None
        prev = ch
    return None, quote


def shell_steps(body: str) -> list[Step]:
    """Commands (continuation lines and multi-line quotes joined), each with its expectations."""
    steps, pending, comments, quote = [], "", [], None
    for line in body.splitlines():
        comment, quote = split_comment(line, quote)
        if comment is not None:
            comments.append(comment)
        pending += line + "\n"
        if quote or (comment is None and line.endswith("\\")):
            continue  # inside a quoted string or a continued line
        code = pending.strip()
        if code and not code.startswith("#"):
            steps.append(Step(code, [e for c in comments if (e := expectation(c))]))
        pending, comments = "", []
    assert not pending.strip(), f"unbalanced quotes in a README shell block: {pending!r}"
    return steps


def python_steps(body: str) -> list[Step]:
    lines = body.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(body).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string[1:]
    steps = []
    for stmt in ast.parse(body).body:
        span = range(stmt.lineno, stmt.end_lineno + 1)
        code = "\n".join(lines[stmt.lineno - 1:stmt.end_lineno])
        steps.append(Step(code, [e for n in span if n in comments and (e := expectation(comments[n]))]))
    return steps


class Walkthrough:
    def __init__(self, work: Path, env: dict, port: int):
        self.work, self.env, self.port = work, env, port
        self.servers: list[subprocess.Popen] = []
        self.namespace: dict = {"__name__": "__readme__"}
        self.checked: list[str] = []
        self.unchecked: list[str] = []
        self.transcript: list[str] = []

    def adapt(self, code: str) -> str:
        code = code.replace("localhost:8000", f"127.0.0.1:{self.port}").replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        if ON_TINY:
            code = code.replace(DEFAULT_MODEL_ID, tiny.TINY_ID)
        return code

    def check(self, step: Step, output: str, where: str) -> None:
        self.transcript.append(f"## {where}\n{step.code}\n---\n{output.strip()}\n")
        for expected in step.expected:
            if expected.endswith(ON_DEFAULT):
                if ON_TINY:
                    self.unchecked.append(expected)
                    continue
                expected = expected[:-len(ON_DEFAULT)].rstrip()
            assert pattern(expected).search(output), (
                f"{where}: README says `{step.code.splitlines()[0]}` prints {expected!r}; it printed:\n{output[-3000:]}")
            self.checked.append(expected)

    def serve(self, code: str, where: str) -> None:
        for old in self.servers:
            old.terminate()
            old.wait(30)
        log = open(self.work / f"server-{len(self.servers)}.log", "wb")
        proc = subprocess.Popen(["bash", "-c", "exec " + code.split("#")[0]], cwd=self.work, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.servers.append(proc)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{where}: the server exited ({proc.returncode}):\n{self.server_log()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise AssertionError(f"{where}: the server was not ready within 600 s:\n{self.server_log()}")

    def server_log(self) -> str:
        logs = sorted(self.work.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-4000:] if logs else ""

    def run_shell(self, block: Block) -> None:
        steps = shell_steps(self.adapt(block.body))
        batch: list[Step] = []
        for step in steps + [None]:
            if step is None or re.match(r"(\S*/)?hotpeft serve\b", step.code):
                self.run_commands(batch, block)
                batch = []
                if step is not None:
                    self.serve(step.code, f"README line {block.line}")
            else:
                batch.append(step)

    def run_commands(self, steps: list[Step], block: Block) -> None:
        if not steps:
            return
        script = "set -euo pipefail\n" + "".join(f"printf '\\n@@step {i}@@\\n'\n{s.code}\n" for i, s in enumerate(steps))
        done = subprocess.run(["bash", "-c", script], cwd=self.work, env=self.env, text=True, timeout=3600,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        outputs = re.split(r"\n@@step \d+@@\n", "\n" + done.stdout)[1:]
        where = f"README line {block.line}"
        assert done.returncode == 0, (
            f"{where}: `{steps[len(outputs) - 1].code}` failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
            f"server log:\n{self.server_log()}")
        for step, out in zip(steps, outputs):
            self.check(step, out, where)

    def run_python(self, block: Block) -> None:
        for step in python_steps(self.adapt(block.body)):
            out = io.StringIO()
            where = f"README line {block.line}"
            with contextlib.redirect_stdout(out):
                try:
                    exec(compile(step.code, f"<README line {block.line}>", "exec", dont_inherit=True), self.namespace)
                except Exception as e:
                    raise AssertionError(f"{where}: `{step.code}` raised {e!r}\nserver log:\n{self.server_log()}") from e
            self.check(step, out.getvalue(), where)

    def close(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_every_walkthrough_block_runs_or_says_why_not():
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 8
    for b in blocks:
        assert b.lang in ("bash", "python"), f"README line {b.line}: a block of the walk-through is `{b.lang}`"
        assert b.skip is None or len(b.skip) > 10, f"README line {b.line}: a skipped block needs its reason"


def test_expectation_patterns():
    assert pattern("mix:<hash> ...").search("mix:3fa2b1 Hello there")
    assert not pattern("mix:<hash> ...").search("noisy@1 Hello")
    assert pattern("unchanged: noisy@2 already has ...").search("unchanged: noisy@2 already has this content")
    steps = shell_steps("x --y   # roll back -> active is now noisy@1\ncurl -d '{\n  # -> no\n}'  # -> {\"a\":1}\n"
                        "a \\\n  b  # -> c\n# -> not a command\n")
    assert [s.expected for s in steps] == [["active is now noisy@1"], ['{"a":1}'], ["c"]]
    assert python_steps("a = 1\nprint(a,\n      2)  # -> 1 2\n")[1].expected == ["1 2"]


def test_readme_walkthrough(tmp_path):
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "scripts").symlink_to(ROOT / "scripts")
    port = free_port()
    env = {**os.environ, "HOTPEFT_HOME": str(tmp_path / "home"), "HOTPEFT_PORT": str(port),
           "HOTPEFT_URL": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("HOTPEFT_API_KEY", "HOTPEFT_ADMIN_KEY", "HOTPEFT_MODEL"):
        env.pop(var, None)
    if ON_TINY:
        # A context long enough for the demo data's dialogues, which the byte-level tokenizer makes long.
        env["HOTPEFT_MODEL"] = str(tiny.save_tiny_model(tmp_path / tiny.TINY_ID, max_positions=2048))
    walk = Walkthrough(work, env, port)
    old_cwd = os.getcwd()
    os.chdir(work)  # Python blocks open files relative to where the shell blocks wrote them
    try:
        for block in blocks:
            if block.skip:
                continue
            (walk.run_shell if block.lang == "bash" else walk.run_python)(block)
    finally:
        os.chdir(old_cwd)
        walk.close()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "readme-walkthrough.txt").write_text("\n".join(walk.transcript))
    assert len(walk.checked) >= 10, walk.checked
    for log in work.glob("server-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-4000:]
