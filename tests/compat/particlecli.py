"""Running Particle's own command-line tool (npm ``particle-cli``, pinned in package.json)
against a corral server, as a user would: a profile in a temporary HOME whose ``apiUrl`` is
set with ``particle config set apiUrl URL``, answers to its prompts on standard input.

Every run is bounded in time; the child is killed when it overstays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

COMPAT_DIR = Path(__file__).resolve().parent
CLI_JS = COMPAT_DIR / "node_modules" / "particle-cli" / "src" / "index.js"
RUN_TIMEOUT_S = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """The text without terminal control sequences (the CLI's spinner and colours)."""
    return _ANSI.sub("", text)


@dataclass
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def ok(self) -> Run:
        assert self.code == 0, f"particle {' '.join(self.args)} -> exit {self.code}\n{self.text}"
        return self


class ParticleCli:
    """``particle`` with its own HOME (so its own profile) pointed at ``base_url``."""

    def __init__(self, node: str, home: Path, base_url: str) -> None:
        self.node = node
        self.home = home
        self.base_url = base_url
        home.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CORRAL_", "PARTICLE_")) and k.lower() not in (
                   "http_proxy", "https_proxy", "all_proxy")}
        env.update({"HOME": str(self.home), "PARTICLE_DISABLE_UPDATE": "true",
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                    "NO_COLOR": "1", "FORCE_COLOR": "0"})
        return env

    async def start(self, *args: str, stdin: str | None = None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            self.node, str(CLI_JS), *args, cwd=self.home, env=self.env(),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None
        if stdin is not None:
            proc.stdin.write(stdin.encode())
            await proc.stdin.drain()
        proc.stdin.close()
        return proc

    async def finish(self, proc: asyncio.subprocess.Process, args: tuple[str, ...],
                     within: float = RUN_TIMEOUT_S) -> Run:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), within)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            pytest.fail(f"particle {' '.join(args)} did not finish in {within} s\n"
                        f"{plain(out.decode(errors='replace'))}"
                        f"{plain(err.decode(errors='replace'))}", pytrace=False)
        assert proc.returncode is not None
        return Run(args, proc.returncode, plain(out.decode(errors="replace")),
                   plain(err.decode(errors="replace")))

    async def __call__(self, *args: str, stdin: str | None = None,
                       within: float = RUN_TIMEOUT_S) -> Run:
        return await self.finish(await self.start(*args, stdin=stdin), args, within)

    async def converse(self, *args: str, answers: list[tuple[str, str]],
                       within: float = RUN_TIMEOUT_S) -> Run:
        """Run a command that prompts: each answer is typed once its prompt (a substring of
        the output) has appeared, the way a person would (the prompt library reads a line
        per question, so answers sent ahead of their prompt would be taken by the first)."""
        proc = await asyncio.create_subprocess_exec(
            self.node, str(CLI_JS), *args, cwd=self.home, env=self.env(),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        seen = b""
        try:
            async with asyncio.timeout(within):
                for prompt, answer in answers:
                    while prompt.encode() not in seen:
                        chunk = await proc.stdout.read(4096)
                        if not chunk:
                            break
                        seen += chunk
                    seen = b""
                    proc.stdin.write(answer.encode() + b"\n")
                    await proc.stdin.drain()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"particle {' '.join(args)}: no prompt {answers} in {within} s",
                        pytrace=False)
        proc.stdin.close()
        return await self.finish(proc, args, within)

    @contextlib.asynccontextmanager
    async def running(self, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
        """A long-running command (``subscribe``); killed on exit if still running."""
        proc = await self.start(*args)
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    def profile(self) -> dict[str, Any]:
        path = self.home / ".particle" / "particle.config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    async def login(self, username: str, password: str) -> str:
        """``config set apiUrl`` then ``login --username --password``; the stored token."""
        (await self("config", "set", "apiUrl", self.base_url)).ok()
        r = (await self("login", "--username", username, "--password", password)).ok()
        assert "Successfully completed login" in r.text, r.text
        token = self.profile().get("access_token")
        assert isinstance(token, str) and len(token) == 40, self.profile()
        return token
