"""The examples in docs/python.md run as written (one namespace, in order)."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "python.md"


def test_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "['absorbed', 'absorbed'] 101" in printed
    assert "(2, 1, 16, 512) (2, 16, 1) inf" in printed
