"""`make demo`'s install is a path entry (editable_mode=compat), so `import megatron_ru` finds the
package even where the working directory holds a same-named folder (the clone itself)."""
import re
import subprocess
import sys

from tests.helpers import ROOT, clean_env


def test_makefile_installs_a_path_entry():
    make = (ROOT / "Makefile").read_text()
    installs = [l for l in make.splitlines() if "pip install -e" in l]
    assert installs and all(re.search(r"editable_mode=(compat|strict)", l) for l in installs), installs


def test_import_from_the_folder_that_holds_the_clone(tmp_path):
    (tmp_path / "megatron_ru").symlink_to(ROOT)  # a clone folder named like the package
    env = {**clean_env(), "PYTHONPATH": str(tmp_path / "megatron_ru")}  # what the compat .pth adds
    proc = subprocess.run([sys.executable, "-c", "import megatron_ru; print(megatron_ru.ModelConfig.__name__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ModelConfig", proc.stderr
