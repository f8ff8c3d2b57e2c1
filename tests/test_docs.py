"""Every Python block of README.md and docs/ runs here, so that no snippet drifts from the API.

The ```python blocks of one page run in order, in one namespace, the way a reader would type them into one
`python -m asyncio` session: a block may use what an earlier block of its page defined, and top-level `await`
works. Each page runs in a fresh directory that holds the files its snippets name (the key files that
`paigeant keys generate orders` and `paigeant keys generate billing` write, and an identity provider's
`idp-jwks.json`), with no `PAIGEANT_*` variable set, so `get_transport()` is the in-memory transport. No block
reaches a real model: `ALLOW_MODEL_REQUESTS` is off (see conftest), the snippets use `"test"` or `FunctionModel`.

An HTML comment on the line before a block changes how it runs. Keep these rare:

- `<!-- docs-test: skip: <why> -->` does not run the block; the reason is required. For a block that changes the
  whole process (configuring tracing) or is a fragment meant to be read, not run.
- `<!-- docs-test: redis -->` / `<!-- docs-test: rabbitmq -->` runs the page's blocks on that broker: the page's
  test is marked (and skipped without the server, failed in CI) like every broker test, `PAIGEANT_TRANSPORT`,
  its URL (the test server) and `PAIGEANT_NAMESPACE` (one of its own, deleted afterwards) are set, and
  `PAIGEANT_ALLOW_UNSIGNED=1`.

The ```bash blocks, and the `$ ` lines of plain ``` transcripts, are checked where it is cheap: each
`paigeant <command>` names a real subcommand, and each `python -m <module>` a module that exists.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from paigeant_ai import Transport, cli, get_transport
from paigeant_ai.security import generate_key

from .brokers import RABBITMQ_URL, REDIS_URL, clean, require_rabbitmq, require_redis

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>.*?)\s*-->\s*$")
_BROKERS = {"redis": (REDIS_URL, require_redis), "rabbitmq": (RABBITMQ_URL, require_rabbitmq)}


@dataclass
class Block:
    """One fenced code block of a page."""

    lang: str
    line: int  # of its first line of code, 1-based
    code: str
    directive: str | None = None


@dataclass
class Page:
    path: Path
    blocks: list[Block] = field(default_factory=list[Block])

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    def python(self) -> list[Block]:
        return [block for block in self.blocks if block.lang in ("python", "py")]

    def broker(self) -> str | None:
        """The broker a `docs-test: redis|rabbitmq` comment asks for, if any."""
        wanted = {block.directive for block in self.python()} & _BROKERS.keys()
        assert len(wanted) <= 1, f"{self.name}: one broker per page"
        return next(iter(wanted), None)


def read_page(path: Path) -> Page:
    """The fenced blocks of a Markdown file, dedented, each with the directive on the line before it."""
    page = Page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = opening["indent"]
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{path.name}:{index + 1}: a code block that never closes"
        code = "\n".join(line.removeprefix(indent) for line in lines[index + 1 : end])
        before = _DIRECTIVE.match(lines[index - 1]) if index else None
        page.blocks.append(Block(opening["lang"], index + 2, code + "\n", before["what"] if before else None))
        index = end + 1
    return page


def pages_with_python() -> Iterator[Any]:
    for path in PAGES:
        page = read_page(path)
        if not page.python():
            continue
        broker = page.broker()
        marks = [getattr(pytest.mark, broker)] if broker else []
        yield pytest.param(page, marks=marks, id=page.name)


@pytest.fixture
def page_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with the key files the snippets name, and no `PAIGEANT_*` setting."""
    for name in [name for name in os.environ if name.startswith("PAIGEANT_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for service in ("orders", "billing"):
        assert cli.main(["keys", "generate", service]) == 0
    issuer = generate_key("idp-1")
    (tmp_path / "idp-jwks.json").write_text(json.dumps({"keys": [issuer.as_dict(private=False)]}))
    return tmp_path


@pytest.mark.parametrize("page", list(pages_with_python()))
async def test_python_blocks_run(page: Page, page_directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = page.broker()
    namespace = f"paigeant-docs-{uuid.uuid4().hex[:12]}"
    if broker:
        url, require = _BROKERS[broker]
        require()
        monkeypatch.setenv("PAIGEANT_TRANSPORT", broker)
        monkeypatch.setenv(f"PAIGEANT_{broker.upper()}_URL", url)
        monkeypatch.setenv("PAIGEANT_NAMESPACE", namespace)
        monkeypatch.setenv("PAIGEANT_ALLOW_UNSIGNED", "1")
    scope: dict[str, Any] = {"__name__": f"docs_{uuid.uuid4().hex[:8]}"}  # the blocks' globals
    try:
        for block in page.python():
            if block.directive and block.directive.startswith("skip"):
                assert block.directive.partition(":")[2].strip(), f"{page.name}:{block.line}: say why it is skipped"
                continue
            await run_block(page, block, scope)
    finally:
        await _close_transports(scope)
        if broker:
            async with get_transport(broker, url=_BROKERS[broker][0], namespace=namespace) as transport:
                await clean(transport, namespace)


async def run_block(page: Page, block: Block, scope: dict[str, Any]) -> None:
    """Run `block` in `scope`, awaiting it when it awaits at the top level; failures name the page's line."""
    # Blank lines first, so that a traceback's line numbers are the page's.
    source = "\n" * (block.line - 1) + block.code
    code = compile(source, str(page.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    result = eval(code, scope)
    if inspect.iscoroutine(result):
        await result


async def _close_transports(scope: dict[str, Any]) -> None:
    """Disconnect what the snippets connected, so that no consumer task outlives the test."""
    for value in list(scope.values()):
        if isinstance(value, Transport):
            with contextlib.suppress(Exception):
                await value.disconnect()


def test_the_directives_are_known() -> None:
    for path in PAGES:
        for block in read_page(path).blocks:
            if block.directive is None:
                continue
            assert block.lang in ("python", "py"), f"{path.name}:{block.line}: a directive on a {block.lang} block"
            assert block.directive in _BROKERS or block.directive.startswith("skip:"), (
                f"{path.name}:{block.line}: unknown directive {block.directive!r}"
            )


def subcommands(capsys: pytest.CaptureFixture[str]) -> set[str]:
    """The subcommands `paigeant --help` lists."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    usage = capsys.readouterr().out
    found = re.search(r"\{([\w,-]+)\}", usage)
    assert found, usage
    return set(found[1].split(","))


def test_bash_blocks_name_commands_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    known = subcommands(capsys)
    checked = 0
    for path in PAGES:
        for block in read_page(path).blocks:
            if block.lang not in ("bash", "sh", "console", ""):
                continue
            for number, line in enumerate(block.code.splitlines(), start=block.line):
                if not block.lang and not line.startswith("$ "):
                    continue  # a transcript: only its commands, not what they printed
                command = line.split("#", 1)[0].strip().removeprefix("$ ")
                for word in re.findall(r"(?:^|[\s;&|(])paigeant (?:-\S+ )*([a-z][\w-]*)", command):
                    assert word in known, f"{path.name}:{number}: `paigeant {word}` is not a command ({known})"
                    checked += 1
                for module in re.findall(r"python -m ([\w.]+)", command):
                    assert importlib.util.find_spec(module) is not None, f"{path.name}:{number}: no module {module}"
                    checked += 1
    assert checked > 10


def test_readme_links_into_the_docs_resolve() -> None:
    """mkdocs checks the links between pages; the README is not a page, so its links are checked here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?://)([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets
    for target in targets:
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
