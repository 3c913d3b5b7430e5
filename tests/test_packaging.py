"""The grammar ships inside the wheel: a non-editable install parses without the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_grammar_and_parses(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("explaind_ql-*.whl")
    assert "explaind_ql/_grammar/explaind.lark" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from explaind_ql.lang import parse, grammar_path; "
            "q = parse('influence of layer emb on test[0..9] over steps 1000:5000 by example'); "
            "print(grammar_path()); print(q.measure)")
    out = subprocess.run([sys.executable, "-c", code, str(site)], check=True, cwd=tmp_path,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(site)) and out[0].endswith("explaind_ql/_grammar/explaind.lark")
    assert out[1] == "influence"
