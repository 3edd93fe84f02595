"""The user docs are tested: README.md, docs/*.md and bench/README.md — their commands run or are checked, links resolve.

Convention (docs/development.md, "Commands in the docs"):
  ```bash      run by this test, block after block, in one temporary directory per document that holds
               links to the repository's top-level files (so `python tools/x.py`, `examples/...` work);
               a block may use files an earlier block of the same document wrote.
  ```bash gpu  not run (a GPU, a cluster, a big model or a long run): every command must start with a
               known entry point and every `--flag` must appear in that entry point's `--help`.
  `make X` and `pip install ...` commands are never run (they install, or take minutes): X must be a
  Makefile target, and an extra in `pip install ".[extra]"` must exist in setup.py.
```python blocks must compile. README.md stays at most 250 lines.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOCS]
README_MAX_LINES = 250
BLOCK_TIMEOUT_S = 180
PYTHONS = {"python", "python3"}
LAUNCHERS = {"mpirun", "mpiexec", "srun", "torchrun", "deepspeed"}
SEPARATORS = {";", "&", "&&", "|", "||"}
# links in the temporary directory: everything at the top of the repository but these
SKIP_TOP = {"runs", "out", "build", "dist"}


# ---------------------------------------------------------------- parsing

class Block:
    def __init__(self, doc: Path, line: int, info: str, text: str):
        self.doc, self.line, self.info, self.text = doc, line, info, text

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info else ""


def read_blocks(doc: Path) -> list[Block]:
    """Fenced code blocks (``` only) with their info string and the line of the opening fence."""
    blocks, current, start, info, body = [], False, 0, "", []
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not current and stripped.startswith("```"):
            current, start, info, body = True, n, stripped[3:].strip(), []
        elif current and stripped == "```":
            blocks.append(Block(doc, start, info, "\n".join(body) + "\n"))
            current = False
        elif current:
            body.append(line)
    assert not current, f"{doc.relative_to(ROOT)}:{start}: code fence never closed"
    return blocks


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block (continuations joined, comments dropped, split at ; & | && ||)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        words: list[str] = []
        for tok in lex:
            if tok in SEPARATORS:
                if words:
                    out.append(words)
                words = []
            else:
                words.append(tok)
        if words:
            out.append(words)
    return out


def strip_assignments(words: list[str]) -> list[str]:
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[i]):
        i += 1
    return words[i:]


# ---------------------------------------------------------------- checks of commands that are not run

@lru_cache(maxsize=None)
def makefile_targets() -> frozenset:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return frozenset(m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


@lru_cache(maxsize=None)
def setup_extras() -> frozenset:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


@lru_cache(maxsize=None)
def help_flags(script: str) -> frozenset:
    """Every --flag named in `python SCRIPT --help` (run once per script; bench scripts: read from their source)."""
    if script.startswith("bench/"):  # plain argparse in the file itself: no need to import torch
        return frozenset(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", (ROOT / script).read_text(encoding="utf-8")))
    env = dict(os.environ, COLUMNS="400", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"python {script} --help failed:\n{res.stderr[-3000:]}"
    return frozenset(re.findall(r"--[A-Za-z0-9][\w-]*", res.stdout))


def is_entry_script(path: str) -> bool:
    if path in ("pretrain_gpt.py", "generate.py"):
        return True
    return bool(re.fullmatch(r"(tools|bench)/\w+\.py", path)) and (ROOT / path).is_file()


def check_make(args: list[str]) -> list[str]:
    targets = [a for a in args if not a.startswith("-") and "=" not in a]
    return [f"make {t}: no such Makefile target" for t in targets if t not in makefile_targets()] \
        or ([] if targets else ["make without a target"])


def check_pip(args: list[str]) -> list[str]:
    errors = []
    for spec in args:
        for extras in re.findall(r"\[([^\]]*)\]", spec):
            errors += [f"pip extra [{e}] is not in setup.py" for e in extras.split(",")
                       if e.strip() not in setup_extras()]
    return errors


def check_pytest(args: list[str]) -> list[str]:
    paths = [a.split("::")[0] for a in args if a.startswith("tests")]
    return [f"pytest path {p} does not exist" for p in paths if not (ROOT / p).exists()]


def check_flags(script: str, args: list[str]) -> list[str]:
    known = help_flags(script)
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]
    return [f"{script}: {f} is not in its --help" for f in flags if f not in known]


def check_command(words: list[str]) -> list[str]:
    """Errors of one command of a ```bash gpu block (empty when it is a known entry with known flags)."""
    words = strip_assignments(words)
    if not words:
        return []
    head, rest = words[0], words[1:]
    if head == "make":
        return check_make(rest)
    if head in ("pip", "pip3"):
        return check_pip(rest)
    if head == "bash":
        script = rest[0] if rest else ""
        ok = re.fullmatch(r"(examples|bench)/[\w.-]+\.sh", script) and (ROOT / script).is_file()
        return [] if ok else [f"bash {script}: not a script under examples/ or bench/"]
    if head in LAUNCHERS:  # skip the launcher's own options up to the program
        i = next((i for i, w in enumerate(rest) if w in PYTHONS or w.endswith(".py")), None)
        if i is None:
            return [f"{head}: no python program in {' '.join(words)}"]
        head, rest = rest[i], rest[i + 1:]
        if head.endswith(".py"):
            rest = [head] + rest
            head = "python"
    if head in PYTHONS and rest[:2] == ["-m", "pytest"]:
        return check_pytest(rest[2:])
    if head in PYTHONS and rest[:2] == ["-m", "pip"]:
        return check_pip(rest[2:])
    if head in PYTHONS and rest and is_entry_script(rest[0]):
        return check_flags(rest[0], rest[1:])
    return [f"not a known entry point: {' '.join(words)[:120]}"]


# ---------------------------------------------------------------- running

def is_checked_only(block: Block) -> bool:
    """make / pip blocks: checked, never run."""
    cmds = [strip_assignments(c) for c in simple_commands(block.text)]
    heads = {c[0] for c in cmds if c}
    if heads & {"make", "pip", "pip3"}:
        assert heads <= {"make", "pip", "pip3"}, f"{block.where}: keep make / pip commands in blocks of their own"
        return True
    return False


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def prepare_workdir(tmp: Path) -> None:
    for item in ROOT.iterdir():
        if not item.name.startswith(".") and item.name not in SKIP_TOP:
            (tmp / item.name).symlink_to(item)


# The first block of a document runs in an empty directory, so a first block that another document
# already ran (the tiny checkpoint several pages start with) leaves the same files: they are copied.
_FIRST_BLOCK_FILES: dict[str, Path] = {}


def run_first_block(block: Block, cwd: Path, cache: Path) -> None:
    done = _FIRST_BLOCK_FILES.get(block.text)
    if done is not None:
        shutil.copytree(done, cwd, symlinks=True, dirs_exist_ok=True)
        return
    run_block(block, cwd)
    keep = cache / f"first-{len(_FIRST_BLOCK_FILES)}"
    shutil.copytree(cwd, keep, symlinks=True, ignore=lambda d, names: [n for n in names if (Path(d) / n).is_symlink()])
    _FIRST_BLOCK_FILES[block.text] = keep


def run_block(block: Block, cwd: Path) -> None:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MEGATRON_RU_LOG_DIR=str(cwd),
               TOKENIZERS_PARALLELISM="false")
    script = "set -euo pipefail\n" + block.text
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{block.where}: block ran over {BLOCK_TIMEOUT_S} s:\n{block.text}\n{out[-4000:]}")
    finally:  # a server the block started in the background, or any other straggler
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{block.where}: exit status {proc.returncode}:\n{block.text}\n{out[-4000:]}"


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def first_block_cache(tmp_path_factory):
    yield tmp_path_factory.mktemp("docs-first-blocks")
    _FIRST_BLOCK_FILES.clear()


def test_readme_is_a_short_front_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(doc: Path) -> frozenset:
    counts: dict[str, int] = {}
    found, in_code = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(f"{base}-{n}" if n else base)  # repeated headings get -1, -2, ...
    return frozenset(found)


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    errors = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            errors.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            errors.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not errors, f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(errors)


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_fences_follow_the_convention(doc):
    for block in read_blocks(doc):
        if block.lang == "bash":
            assert block.info in ("bash", "bash gpu"), f"{block.where}: fence ```{block.info}: use bash or bash gpu"
        if block.lang == "python":
            compile(block.text, block.where, "exec")


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_python_blocks_import_what_exists(doc):
    """Every `from megatron_ru... import NAME` shown in the docs names a module and attribute that exist
    (a moved function leaves no stale example behind)."""
    import ast
    import importlib
    errors = []
    for block in read_blocks(doc):
        if block.lang != "python":
            continue
        for node in ast.walk(ast.parse(block.text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_ru"):
                module = importlib.import_module(node.module)
                errors += [f"{block.where}: {node.module} has no {a.name}" for a in node.names
                           if not hasattr(module, a.name)
                           and not (hasattr(module, "__path__")
                                    and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert not errors, "\n".join(errors)


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_commands_not_run_are_known(doc):
    errors = []
    for block in read_blocks(doc):
        if block.info == "bash gpu" or (block.info == "bash" and is_checked_only(block)):
            for words in simple_commands(block.text):
                errors += [f"{block.where}: {e}" for e in check_command(words)]
    assert not errors, "\n".join(errors)


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_runnable_blocks_run(doc, first_block_cache):
    blocks = [b for b in read_blocks(doc) if b.info == "bash" and not is_checked_only(b)]
    if not blocks:
        pytest.skip("no runnable block")
    ports = {int(p) for b in blocks for p in re.findall(r"--port (\d+)", b.text)}
    busy = sorted(p for p in ports if port_in_use(p))
    if busy:
        pytest.skip(f"port {busy} is in use on this machine")
    with tempfile.TemporaryDirectory(prefix="docs-") as tmp:
        prepare_workdir(Path(tmp))
        run_first_block(blocks[0], Path(tmp), first_block_cache)
        for block in blocks[1:]:
            run_block(block, Path(tmp))
