"""The README's Python examples run as written, and its first lines are the two commands."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```", 2)[1]
    assert "make run" in head and "make test" in head


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "'acc':" in out
    assert "['ce', 'hint', 'kd', 'logits', 'loss']" in out
