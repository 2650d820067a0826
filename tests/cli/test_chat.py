"""What `bitune chat` prints: the banner, the prompts and the answers, and nothing from the libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitune import BituneConfig, BituneModel


def test_chat_prints_answers_without_library_warnings(stories260k: Path, tmp_path: Path) -> None:
    """Loading a checkpoint makes peft read a deprecated transformers property (a FutureWarning) and transformers
    show a progress bar: neither reaches the terminal, where they would land between the answers."""
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(stories260k),
        LoraConfig(r=4, target_modules="all-linear"),
        BituneConfig(),
    )
    model.save_pretrained(tmp_path / "ckpt", tokenizer=AutoTokenizer.from_pretrained(stories260k))
    command = [
        sys.executable,
        "-m",
        "bitune",
        "chat",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--device",
        "cpu",
    ]
    command += ["--max-new-tokens", "12", "--stop", ","]
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    finished = subprocess.run(
        command,
        input="Once upon a time\nTell me a story.\n\n",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as a terminal shows them: interleaved
        text=True,
        timeout=300,
        env={**environment, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert finished.returncode == 0, finished.stdout
    lines = finished.stdout.splitlines()
    assert lines[0] == f"Chatting with {tmp_path / 'ckpt'}. An empty line or Ctrl-D ends the chat.", (
        finished.stdout
    )
    answers = [line.removeprefix("you> model> ") for line in lines[1:] if line.startswith("you> model> ")]
    assert len(answers) == 2 and all(answer.strip() for answer in answers), finished.stdout
    assert all("," not in answer[:-1] for answer in answers)  # --stop ends the answer at the first comma
    assert set(lines[1:]) <= {"", "you> ", *(f"you> model> {answer}" for answer in answers)}, finished.stdout
