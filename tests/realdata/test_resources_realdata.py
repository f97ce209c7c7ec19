"""The resource manifest against the real files in ../shared/data: every digest matches, and a cache
filled from them (as the container build fills its cache) serves a participant-level preflight."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bids_app.cli.resources import main as resources_main
from bids_app.resources import Places, load_manifest, resolve_template

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def shared() -> Path:
    root = os.getenv("ARBORSEG_SHARED_DATA")
    if not root or not Path(root, "templateflow").is_dir():
        pytest.fail("set ARBORSEG_SHARED_DATA to ../shared/data to run the real-data layer")
    return Path(root)


def test_every_manifest_digest_matches_the_real_files(shared, capsys, monkeypatch):
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    monkeypatch.delenv("ARBORSEG_CACHE_DIR", raising=False)
    code = resources_main(["status", "--json", "--templateflow-home", str(shared / "templateflow"),
                           "--atlas-dir", str(shared / "atlases")])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {r["id"] for r in rows} == {r.id for r in load_manifest()}
    assert all(r["state"] == "ok" for r in rows), [(r["id"], r["state"], r["detail"]) for r in rows]


def test_fetch_into_a_cache_then_resolve_from_it(shared, tmp_path, monkeypatch):
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    monkeypatch.delenv("ARBORSEG_CACHE_DIR", raising=False)
    cache = tmp_path / "cache"
    assert resources_main(["fetch", "--cache-dir", str(cache), "--from", str(shared)]) == 0
    fetched = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}
    auto = [r for r in load_manifest() if r.fetch == "auto"]
    assert len(fetched) == len(auto)
    tpl = resolve_template("MNI152NLin6Asym", places=Places(cache_dir=cache, environ={}, offline=True))
    assert tpl.target.is_relative_to(cache) and tpl.brain_mask.is_relative_to(cache)
