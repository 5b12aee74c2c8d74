"""Every command in docs/interop.md's ``bash`` blocks runs as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.helpers import tool
from tests.training.helpers import REPO

DOC = REPO / "docs" / "interop.md"


def doc_commands(markdown: str) -> list[list[str]]:
    """The argv of each command in the ``bash`` blocks (continuation lines joined, comments cut)."""
    text = "\n".join(re.findall(r"```bash\n(.*?)```", markdown, re.S)).replace("\\\n", " ")
    return [argv for line in text.splitlines() if (argv := shlex.split(line, comments=True))]


@pytest.mark.slow
def test_every_command_of_docs_interop_runs_as_written(single_run, tmp_path, monkeypatch, capsys):
    # The names the page uses: runs/tiny (checkpoint step_100), and the export standing in for
    # a downloaded OLMo 2 folder; tools/ and the lm-eval tasks as in the repository.
    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    for name in (".hydra", "csv", "tokenizer.json", "tokenizer_config.json"):
        (run / name).symlink_to(single_run / name)
    (run / "checkpoints" / "step_100").symlink_to(single_run / "checkpoints" / "step_2")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "OLMo-2-0425-1B").symlink_to("tiny")
    for name in ("tools", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "held_out.jsonl").write_text(
        "".join(
            json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(5)
        )
    )
    (tmp_path / "notes.txt").write_text("import os\n\nprint(os.getcwd())\n")
    monkeypatch.chdir(tmp_path)

    ran = set()
    for argv in doc_commands(DOC.read_text()):
        if argv[0] == "lm_eval":
            result = subprocess.run(
                [sys.executable, "-m", "lm_eval", *argv[1:]],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr[-4000:]
            assert list(Path("evals/tiny").rglob("results_*.json"))
            ran.add("lm_eval")
            continue
        assert argv[0] == "python" and argv[1].startswith("tools/"), argv
        code = tool(Path(argv[1]).stem).main(argv[2:])
        assert code == 0, (argv, capsys.readouterr().err)
        ran.add(argv[1])
    assert ran == {"tools/convert_hf.py", "tools/generate.py", "tools/evaluate.py", "lm_eval"}
