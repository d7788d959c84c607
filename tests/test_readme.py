"""The README's Python quickstart must run as written."""

import re

from conftest import REPO_ROOT


def test_readme_python_quickstart_runs():
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["result"].history.final_accuracy > 0.85


def test_ci_runs_exactly_the_readme_test_command():
    text = (REPO_ROOT / "README.md").read_text()
    command = re.search(r"Install and run the test suite.*?```bash\n(.*?)\n```", text, re.S).group(1).strip()
    assert command in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
