"""Folder locks, the leftovers of interrupted atomic writes, checksums."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bitune.errors import BituneInputError
from bitune.files import atomic_directory, file_sha256, lock_folder, remove_leftovers


def test_a_locked_folder_refuses_a_second_holder_until_released(tmp_path):
    with lock_folder(tmp_path / "run", ".lock", "output_dir") as folder:
        assert folder.is_dir() and f"process {os.getpid()} on " in (folder / ".lock").read_text()
        with (
            pytest.raises(
                BituneInputError,
                match=rf"output_dir {tmp_path / 'run'} is in use by another run \(process {os.getpid()}",
            ),
            lock_folder(tmp_path / "run", ".lock", "output_dir"),
        ):
            pass
    assert not (tmp_path / "run" / ".lock").exists()
    with lock_folder(tmp_path / "run", ".lock"):
        pass


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    code = "import fcntl, os, sys\nf = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); os._exit(9)\n"
    (tmp_path / "run").mkdir()
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / ".lock")]).returncode == 9
    with lock_folder(tmp_path / "run", ".lock"):  # the file is still there; its lock died with the process
        pass


def test_a_file_is_no_folder_to_lock(tmp_path):
    (tmp_path / "f").write_text("x")
    with (
        pytest.raises(BituneInputError, match="output_dir .* is a file, not a folder"),
        lock_folder(tmp_path / "f", what="output_dir"),
    ):
        pass


def test_leftovers_of_interrupted_writes_are_removed_and_a_retired_folder_restored(tmp_path):
    for name in (
        ".tmp-checkpoint-3/checkpoint-3/x",
        ".tmp-final-abcd1234/x",
        ".old-final-wxyz9876/final/x",
        ".tmp-x.txt",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / ".tmp-log.jsonl-k2j3h4g5").write_text("half")
    removed = remove_leftovers(tmp_path, re.compile(r"checkpoint-\d+|final|log\.jsonl"))
    assert sorted(p.name for p in removed) == [
        ".old-final-wxyz9876",
        ".tmp-checkpoint-3",
        ".tmp-final-abcd1234",
        ".tmp-log.jsonl-k2j3h4g5",
    ]
    # The replacement of final/ never completed: its old content is final/ again.
    assert (tmp_path / "final" / "x").read_text() == ".old-final-wxyz9876/final/x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-x.txt", "final"]


def test_a_failed_atomic_directory_write_leaves_the_old_folder(tmp_path):
    with atomic_directory(tmp_path / "a") as staging:
        (staging / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "a") as staging:
        (staging / "v").write_text("2")
        raise RuntimeError
    assert (tmp_path / "a" / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["a"]
    assert (
        file_sha256(tmp_path / "a" / "v")
        == "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
    )
