"""A built wheel (not only the editable install) ships everything: iicl_fast.kernels, data."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_and_imports_everything(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("iicl_fast-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("iicl_fast/_C") and n.endswith(".so") for n in names), "no compiled extension"
    for must in ["iicl_fast/__init__.py", "iicl_fast/cli.py", "iicl_fast/kernels/__init__.py",
                 "iicl_fast/data/demo.txt", "iicl_fast/data/demo_questions.json",
                 "iicl_fast/data/general_questions.json", "iicl_fast/data/heldout.txt", "iicl_fast/evaluation.py"]:
        assert must in names, must
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import iicl_fast, iicl_fast.kernels, iicl_fast.cli, iicl_fast.memory, iicl_fast._C; "
            "print(iicl_fast.kernels.__file__, iicl_fast.cli.demo_material()[1][0]['question'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout
    assert str(target) in out and "Verlaine" in out
