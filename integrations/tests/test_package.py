"""The Python distribution (integrations/pyproject.toml): a wheel built from a copy of the
repository's integrations/, installed into a fresh virtual environment (which sees the system's
torch), is importable as `ckptd` from anywhere with no sys.path edits, declares vLLM's plugin
entry point and the `ckptd-push` script, and the old import paths of the repository still work.

Needs pip, venv and setuptools with wheel for the python that runs it (Debian: python3-pip,
python3-venv, python3-setuptools, python3-wheel): without them it is skipped, unless CI=true.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # integrations/
MISSING = [m for m in ("pip", "venv", "setuptools", "wheel") if importlib.util.find_spec(m) is None]


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, **kw)


@unittest.skipIf(MISSING and os.environ.get("CI") != "true", f"no {', '.join(MISSING)} for {sys.executable}")
class PackageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if MISSING:
            raise AssertionError(f"CI=true, but {sys.executable} lacks {', '.join(MISSING)}")
        cls.tmp = tempfile.mkdtemp(prefix="ckptd-test-")
        src = os.path.join(cls.tmp, "src")
        shutil.copytree(HERE, src, ignore=shutil.ignore_patterns("tests", "__pycache__", "*.egg-info", "build"))
        wheels = os.path.join(cls.tmp, "wheels")
        run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels, src)
        (cls.wheel,) = [os.path.join(wheels, w) for w in os.listdir(wheels)]
        cls.venv = os.path.join(cls.tmp, "venv")
        run(sys.executable, "-m", "venv", "--system-site-packages", cls.venv)
        cls.python = os.path.join(cls.venv, "bin", "python")
        run(cls.python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", cls.wheel)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def env(cls):
        """The venv sees the system's site-packages, not a user's: torch's own directory is added
        where this python finds it elsewhere (that directory holds no ckptd)."""
        spec = importlib.util.find_spec("torch")
        torch_dir = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else ""
        return {**os.environ, "PYTHONPATH": torch_dir}

    def installed(self, code):
        # from a directory outside the repository: only the installed package can be found
        return run(self.python, "-c", code, cwd=self.tmp, env=self.env()).stdout.strip()

    def test_the_wheel_holds_the_packages(self):
        self.assertRegex(os.path.basename(self.wheel), r"^ckptd-0\.1\.0-py3-none-any\.whl$")
        out = self.installed(
            "import ckptd, ckptd.vllm.extension, ckptd.vllm.plugin, ckptd.vllm.load, ckptd.sglang, ckptd.trainer;"
            "print(ckptd.__file__); print(ckptd.Receiver.__module__)")
        path, module = out.splitlines()
        self.assertTrue(path.startswith(self.venv), path)
        self.assertEqual(module, "ckptd.receiver")

    def test_vllm_finds_the_plugin_entry_point(self):
        out = self.installed(
            "from importlib.metadata import entry_points;"
            "[print(e.name, e.value) for e in entry_points(group='vllm.general_plugins')]")
        self.assertIn("ckptd ckptd.vllm.plugin:register", out.splitlines())
        # without vLLM installed, registering is a no-op that says so
        self.assertEqual(self.installed("from ckptd.vllm.plugin import register; print(register())"), "False")

    def test_the_push_script(self):
        script = os.path.join(self.venv, "bin", "ckptd-push")
        res = subprocess.run([script], capture_output=True, text=True, timeout=120, cwd=self.tmp, env=self.env())
        self.assertEqual(res.returncode, 1)
        self.assertIn("usage: ckptd-push URL NAME [http|shm|staged] [TOKENS_FILE]", res.stderr)

    def test_the_repository_paths_still_work(self):
        code = ("from integrations.ckptd_receiver import Receiver; from integrations import vllm_extension, "
                "sglang_adapter, trainer_push; from integrations.ckptd import Receiver as R;"
                "print(Receiver is R, vllm_extension.CkptdWorkerExtension.__module__)")
        out = run(sys.executable, "-c", code, cwd=os.path.dirname(HERE)).stdout.strip()
        self.assertEqual(out, "True integrations.ckptd.vllm.extension")


if __name__ == "__main__":
    unittest.main()
