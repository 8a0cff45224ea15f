"""Every code block of the user docs runs: README.md and docs/*.md, page by page.

How a page is run (in a fresh temporary folder as the working directory, ``HF_HUB_OFFLINE=1``):

* ````` ```python ````` blocks are executed in order in **one namespace per page**, so a block may use what an
  earlier block of the same page defined.
* ````` ```bash ````` / ``sh`` / ``shell`` / ``console`` blocks: every ``resilient-tune ...`` command line is parsed
  with the real argparse parser (so every documented command line is valid), then run through the CLI's ``main()``
  in the page's folder and must exit 0 — except in a block that runs ``resilient-tune demo`` (minutes of training),
  whose command lines are only parsed. Other shell lines (``pip``, ``bash scripts/...``, ``torchrun``, ``pytest``,
  ``python train.py``) are not run.
* ``<!-- docs-test: skip (reason) -->`` right before a block: the block is not run. The reason is required and
  skips are capped (:data:`MAX_SKIPS`), so they stay rare: only blocks that cannot run here (GPU, several processes,
  hours of training).
* ``<!-- docs-test: setup`` ... ``-->`` (Python inside the comment, invisible in rendered markdown): run in the
  page's namespace at that point — for the tiny stand-ins a page's examples name (``./base``, ``./fine-tuned``).
  ``tiny_checkpoints(*names)`` is available there: tiny GPT-2 checkpoint folders (with a tokenizer), one per name.

Blocks of pages owned by others that fail and were reported rather than fixed are listed in :data:`KNOWN_BROKEN`;
they run, and a failure there is counted and printed, not raised. Every other failure fails the page.

The rest checks that the reference pages stay true to the code: every name of ``resilient_tune.__all__`` has a
section in docs/api.md with the real parameter names, every flag of every subcommand is in docs/cli.md, and
mkdocs.yml, docs/index.md and the README reach every page.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import shlex
import shutil
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import resilient_tune
from resilient_tune import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

MAX_SKIPS = 6  # skip markers over all pages; raise only with a reason in the commit message
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PARSE_ONLY_COMMANDS = {"demo"}  # a block running one of these is parsed, not run

# pages linked from the index and the nav while their author is still writing them
PENDING_PAGES: set[str] = set()

# parameters documented while their author is still committing them: public name -> parameter names
PENDING_PARAMS: dict[str, set[str]] = {}

# (page relative to the repository, a piece of the block's code) -> why it fails; reported to the page's owner.
# A listed block that fails is counted and printed, not raised; once fixed it simply runs.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}

_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<body>.*?)-->", re.S)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    """A fenced code block (``lang`` its info string) or a hidden setup (``lang == "setup"``)."""

    page: Path
    line: int  # 1-based line of the opening fence (or of the comment)
    lang: str
    code: str
    skip: str | None = None  # the reason, when marked skip

    @property
    def where(self) -> str:
        return f"{_name(self.page)}:{self.line}"


def _name(page: Path) -> str:
    """The page's path relative to the repository (its file name when outside it)."""
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def parse_page(page: Path) -> list[Block]:
    """The page's code blocks and setup comments, in order; skip markers attached to the block they precede."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str] | None = None  # (line, skip reason) waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<!--" in line and "docs-test:" in line:
            start = i
            while "-->" not in lines[i]:
                i += 1
                if i == len(lines):
                    raise AssertionError(f"{page.name}:{start + 1}: docs-test comment is never closed")
            body = _DIRECTIVE.search("\n".join(lines[start : i + 1]))
            if body is None:
                raise AssertionError(f"{page.name}:{start + 1}: malformed docs-test comment")
            text = body.group("body")
            if text.startswith("setup"):
                code = textwrap.dedent(text[len("setup") :]).strip("\n")
                blocks.append(Block(page, start + 1, "setup", code + "\n"))
            elif text.startswith("skip"):
                reason = re.fullmatch(r"skip\s*\((?P<why>.+)\)\s*", text, re.S)
                if reason is None or not reason.group("why").strip():
                    raise AssertionError(
                        f"{page.name}:{start + 1}: a skip marker needs a reason: <!-- docs-test: skip (why) -->"
                    )
                pending = (start + 1, " ".join(reason.group("why").split()))
            else:
                raise AssertionError(f"{page.name}:{start + 1}: unknown docs-test directive {text.strip()!r}")
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            start, body_lines = i, []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(marker):
                body_lines.append(lines[i])
                i += 1
            code = textwrap.dedent("\n".join(body_lines)) + "\n"
            blocks.append(Block(page, start + 1, lang, code, skip=pending[1] if pending else None))
            pending = None
            i += 1
            continue
        if line.strip() and pending is not None:
            raise AssertionError(
                f"{page.name}:{pending[0]}: a skip marker must come right before its code block"
            )
        i += 1
    if pending is not None:
        raise AssertionError(f"{page.name}:{pending[0]}: a skip marker with no code block after it")
    return blocks


def _runnable(block: Block) -> bool:
    return block.lang == "python" or block.lang in SHELL_LANGS


# --------------------------------------------------------------------------------------------- shell commands
def shell_commands(code: str) -> list[list[str]]:
    """The ``resilient-tune`` command lines of a shell block, as argv lists (program name dropped)."""
    commands = []
    for logical in code.replace("\\\n", " ").splitlines():
        logical = logical.strip().removeprefix("$ ")  # a console prompt
        try:
            tokens = shlex.split(logical, comments=True)
        except ValueError:
            continue  # not a simple command line (a heredoc, ...): not ours
        for cut in ("|", "||", "&&", ";", ">", ">>", "2>&1"):
            if cut in tokens:
                tokens = tokens[: tokens.index(cut)]
        while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
            tokens = tokens[1:]  # environment assignments before the command
        if tokens and tokens[0] == "resilient-tune":
            commands.append(tokens[1:])
    return commands


def _parse(argv: list[str]) -> int:
    """Parse ``argv`` with the real parser: 0 when valid (``--help`` included), argparse's status otherwise."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            cli._build_parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise AssertionError(f"resilient-tune {shlex.join(argv)}: {err.getvalue().strip()}") from None
    return 0


def _run_cli(argv: list[str]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # --help, --version
            status = exc.code or 0
    if status != 0:
        raise AssertionError(f"resilient-tune {shlex.join(argv)} exited {status}: {err.getvalue().strip()}")
    return out.getvalue()


# --------------------------------------------------------------------------------------------- running a page
@dataclass
class Tally:
    python_run: int = 0
    commands_run: int = 0
    commands_parsed: int = 0
    skipped: int = 0
    known_broken: int = 0


def _known_broken(block: Block) -> str | None:
    page = _name(block.page)
    for (where, needle), why in KNOWN_BROKEN.items():
        if where == page and needle in block.code:
            return why
    return None


def run_page(page: Path, namespace: dict, tally: Tally) -> list[str]:
    """Run every block of ``page``; returns the failures (``page:line`` and the error)."""
    failures = []
    for block in parse_page(page):
        if not (_runnable(block) or block.lang == "setup"):
            continue
        if block.skip is not None:
            tally.skipped += 1
            continue
        try:
            if block.lang in ("python", "setup"):
                exec(compile(block.code, block.where, "exec"), namespace)
                tally.python_run += block.lang == "python"
            else:
                commands = shell_commands(block.code)
                parse_only = any(
                    cmd and cmd[0] in PARSE_ONLY_COMMANDS and "--help" not in cmd for cmd in commands
                )
                for argv in commands:
                    _parse(argv)
                    if parse_only:
                        tally.commands_parsed += 1
                    else:
                        _run_cli(argv)
                        tally.commands_run += 1
        except Exception:
            error = traceback.format_exc(limit=-3).strip()
            known = _known_broken(block)
            if known is not None:
                tally.known_broken += 1
                print(f"known broken (reported): {block.where}: {known}")
                continue
            failures.append(f"{block.where} ({block.lang} block) failed:\n{error}")
    return failures


_MAX_CHECKPOINTS = 8


@pytest.fixture
def tiny_checkpoints(tiny_gpt2_dirs):
    """``tiny_checkpoints(*names)``: tiny GPT-2 checkpoints (own seeds, one tokenizer) copied to ``./<name>``."""

    def make(*names: str) -> list[Path]:
        sources = tiny_gpt2_dirs(_MAX_CHECKPOINTS)  # one cached set for every page
        if len(names) > _MAX_CHECKPOINTS:
            raise ValueError(
                f"tiny_checkpoints makes at most {_MAX_CHECKPOINTS} checkpoints, got {len(names)}"
            )
        made = []
        for name, source in zip(names, sources):
            shutil.copytree(source, name)
            made.append(Path(name))
        return made

    return make


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_blocks_run(page, tmp_path, monkeypatch, tiny_checkpoints, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tally = Tally()
    namespace = {"__name__": "__docs__", "tiny_checkpoints": tiny_checkpoints}
    failures = run_page(page, namespace, tally)
    with capsys.disabled():
        print(f"\n{page.relative_to(ROOT)}: {tally}")
    assert not failures, "\n\n".join(failures)


def test_skip_markers_are_few_and_give_reasons():
    skips = [(b.where, b.skip) for page in PAGES for b in parse_page(page) if b.skip is not None]
    assert len(skips) <= MAX_SKIPS, f"{len(skips)} skipped blocks (at most {MAX_SKIPS}): {skips}"
    assert all(reason for _, reason in skips)


def test_parser_of_the_page_format(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- docs-test: setup\nx = 1\n-->\n\n```python\ny = x + 1\n```\n\n"
        "<!-- docs-test: skip (needs 2 GPUs) -->\n```bash\ntorchrun --nproc_per_node 2 t.py\n```\n"
        "```bash\nHF_HUB_OFFLINE=1 resilient-tune merge a b \\\n  --out c  # comment\npip install x\n"
        "$ resilient-tune methods | head -3\n```\n"
    )
    setup, py, skipped, shell = parse_page(page)
    assert (setup.lang, setup.code) == ("setup", "x = 1\n")
    assert (py.lang, py.code, py.skip) == ("python", "y = x + 1\n", None)
    assert (skipped.lang, skipped.skip) == ("bash", "needs 2 GPUs")
    assert shell_commands(shell.code) == [["merge", "a", "b", "--out", "c"], ["methods"]]
    page.write_text("<!-- docs-test: skip () -->\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="needs a reason"):
        parse_page(page)
    page.write_text("<!-- docs-test: skip (why) -->\nprose in between\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="right before"):
        parse_page(page)


def test_a_failing_block_fails_its_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is 1'\n```\n")
    tally = Tally()
    failures = run_page(page, {}, tally)
    assert len(failures) == 1 and "page.md:5" in failures[0] and "x is 1" in failures[0]
    assert tally.python_run == 1


# --------------------------------------------------------------------------------------------- reference pages
def _section(text: str, heading: str) -> str:
    """The text under the first heading line containing ``heading``, up to the next heading of that level or above."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and heading in line:
            level = len(line) - len(line.lstrip("#"))
            end = next(
                (j for j in range(i + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[j])), len(lines)
            )
            return "\n".join(lines[i + 1 : end])
    raise AssertionError(f"no heading containing {heading!r}")


def _documented_parameters(section: str) -> list[str]:
    """Parameter names of the first ```text signature block of an API section."""
    match = re.search(r"```text\n(.*?)```", section, re.S)
    assert match, "no ```text signature block"
    signature = " ".join(match.group(1).split())
    inner = signature[signature.index("(") + 1 : signature.rindex(")")]
    names = []
    for part in re.split(r",(?![^\[(]*[\])])", inner):
        name = part.strip().split("=")[0].split(":")[0].strip().lstrip("*")
        if name and name != "/":
            names.append(name)
    return names


@pytest.mark.parametrize("name", [n for n in resilient_tune.__all__ if n != "__version__"])
def test_api_reference_documents_every_public_name(name):
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    section = _section(text, f"`{name}`")
    obj = getattr(resilient_tune, name)
    if isinstance(obj, type) and issubclass(obj, Exception):
        return  # errors: a heading and a description are enough
    target = obj.__init__ if isinstance(obj, type) else obj
    actual = [p for p in inspect.signature(target).parameters if p != "self"]
    documented = [
        p for p in _documented_parameters(section) if p in actual or p not in PENDING_PARAMS.get(name, ())
    ]
    assert documented == actual, f"{name}: docs/api.md documents {documented}, the code has {actual}"


def _subcommands() -> dict[str, object]:
    parser = cli._build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_cli_reference_documents_every_flag(command):
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    section = _section(text, f"`resilient-tune {command}`")
    missing = []
    for action in _subcommands()[command]._actions:
        names = action.option_strings or [action.metavar or action.dest]
        if "--help" in names:
            continue
        if not any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", section) for n in names):
            missing.append("/".join(names))
    assert not missing, f"docs/cli.md, section resilient-tune {command}: not documented: {missing}"


def test_console_script_help_runs():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "resilient_tune.cli", "merge", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--weights" in result.stdout, result.stderr


def _links(text: str) -> set[str]:
    return set(re.findall(r"\]\(([^)#\s]+\.md)", text))


def test_every_page_is_reachable():
    pages = {p.name for p in DOCS.glob("*.md")}
    index = _links((DOCS / "index.md").read_text(encoding="utf-8"))
    assert pages - {"index.md"} <= index, (
        f"docs/index.md does not link {sorted(pages - index - {'index.md'})}"
    )
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = set(re.findall(r"[\w-]+\.md", str(config["nav"])))
    assert pages <= nav, f"mkdocs.yml nav lacks {sorted(pages - nav)}"
    assert config.get("docs_dir", "docs") == "docs"
    readme = _links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert {"docs/index.md", "docs/quickstart.md"} <= readme
    for link in readme | {f"docs/{name}" for name in index | nav}:
        assert (ROOT / link).is_file() or Path(link).name in PENDING_PAGES, f"broken link {link}"


def _slug(heading: str) -> str:
    """GitHub's (and mkdocs toc's, for ASCII headings) anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_anchor_links_resolve():
    anchors = {}
    for page in PAGES:
        prose = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        anchors[page.resolve()] = {_slug(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}
    broken = []
    for page in PAGES:
        for link, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text(encoding="utf-8")):
            target = (page.parent / link).resolve() if link else page.resolve()
            if target in anchors and anchor not in anchors[target]:
                broken.append(f"{_name(page)}: {link}#{anchor}")
    assert not broken, f"links to headings that do not exist: {broken}"
