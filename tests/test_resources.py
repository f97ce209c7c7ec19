"""The resource manifest, the lookup order, sha256 checks, downloads and ``arborseg-resources``."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import pytest

from bids_app.cli import resources as cli
from bids_app.errors import ResourceError
from bids_app.resources import (GROUPS, MANIFEST_TEMPLATES, Places, Resource, content_sha256, load_manifest,
                                locate, require, resolve_template)

PAYLOAD = b"ArborSeg test resource\n" * 100


def _resource(**kw) -> Resource:
    base = dict(id="test-atlas", group="atlas", path="testatlas/labels.nii.gz", url="http://127.0.0.1:1/x.nii",
                sha256=hashlib.sha256(PAYLOAD).hexdigest(), role="a test atlas", needed_by="preprocessing")
    base.update(kw)
    return Resource(**base)


def _write(path: Path, data: bytes = PAYLOAD, *, gz: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


@pytest.fixture()
def server(tmp_path):
    """A local HTTP server over ``tmp_path/www`` (the download path without internet)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# --------------------------------------------------------------------------- the manifest
def test_manifest_is_complete_and_pinned():
    manifest = load_manifest()
    ids = [r.id for r in manifest]
    assert len(ids) == len(set(ids))
    assert len({(r.group, r.path) for r in manifest}) == len(manifest)
    for r in manifest:
        assert r.group in GROUPS
        assert re.fullmatch(r"[0-9a-f]{64}", r.sha256), r.id
        # upstream files at a pinned commit, never a moving branch
        assert re.match(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/", r.url), r.id
        assert r.licence and r.role and r.needed_by and r.citation
        assert r.fetch in ("auto", "manual")
        assert r.fetch == "auto" or r.how
    # everything preprocessing reads is listed
    needed = {rid for roles in MANIFEST_TEMPLATES.values() for rid in roles.values()}
    assert needed <= set(ids)
    assert {r.group for r in manifest} == {"templateflow", "atlas"}


def test_content_sha256_ignores_compression(tmp_path):
    plain = _write(tmp_path / "a.nii", gz=False)
    packed = _write(tmp_path / "a.nii.gz")
    expected = hashlib.sha256(PAYLOAD).hexdigest()
    assert content_sha256(plain) == content_sha256(packed) == expected
    # a different gzip header (name, mtime) still gives the same digest
    with gzip.GzipFile(tmp_path / "b.nii.gz", "wb", mtime=12345) as fh:
        fh.write(PAYLOAD)
    assert content_sha256(tmp_path / "b.nii.gz") == expected


# --------------------------------------------------------------------------- lookup order
def test_lookup_order_flag_env_cache(tmp_path):
    res = _resource()
    flag, env, cache = tmp_path / "flag", tmp_path / "env", tmp_path / "cache"
    for folder in (env, cache / "atlases"):
        _write(folder / res.path)
    places = Places(atlas_dir=flag, cache_dir=cache, environ={"ARBORSEG_ATLAS_DIR": str(env)}, offline=True)
    assert locate(res, places).origin == "$ARBORSEG_ATLAS_DIR"  # the flag's folder has no copy
    _write(flag / res.path)
    found = locate(res, places)
    assert (found.origin, found.path, found.state) == ("--atlas-dir", flag / res.path, "ok")
    no_env = Places(cache_dir=cache, environ={}, offline=True)
    assert locate(res, no_env).path == cache / "atlases" / res.path


def test_wrong_digest_is_skipped_for_the_next_copy(tmp_path):
    res = _resource()
    _write(tmp_path / "flag" / res.path, b"corrupted")
    _write(tmp_path / "cache" / "atlases" / res.path)
    places = Places(atlas_dir=tmp_path / "flag", cache_dir=tmp_path / "cache", environ={}, offline=True)
    found = locate(res, places)
    assert found.origin == "cache" and found.state == "ok"
    # with no good copy the resource is missing, and the reason names the bad file
    (tmp_path / "cache" / "atlases" / res.path).unlink()
    found = locate(res, places)
    assert not found.usable and "sha256" in found.detail and "flag" in found.detail


def test_manual_resource_with_other_digest_is_used(tmp_path):
    res = _resource(fetch="manual", how="convert it by hand")
    _write(tmp_path / "flag" / res.path, b"a user's own conversion")
    found = locate(res, Places(atlas_dir=tmp_path / "flag", environ={}, offline=True))
    assert found.state == "mismatch" and found.usable


# --------------------------------------------------------------------------- downloads
def test_download_gzips_and_verifies(tmp_path, server):
    www, base = server
    _write(www / "labels.nii", gz=False)
    res = _resource(url=f"{base}/labels.nii")
    places = Places(cache_dir=tmp_path / "cache", environ={})
    found = locate(res, places)
    dest = tmp_path / "cache" / "atlases" / res.path
    assert (found.state, found.path) == ("downloaded", dest)
    assert dest.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(dest.read_bytes()) == PAYLOAD
    # the second time it is found in the cache
    assert locate(res, places).state == "ok"


def test_download_with_wrong_digest_leaves_nothing(tmp_path, server):
    www, base = server
    _write(www / "labels.nii", b"tampered", gz=False)
    res = _resource(url=f"{base}/labels.nii")
    found = locate(res, Places(cache_dir=tmp_path / "cache", environ={}))
    assert not found.usable
    assert "sha256" in found.detail
    folder = tmp_path / "cache" / "atlases" / "testatlas"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_no_download_when_offline_or_unreachable(tmp_path, server):
    www, base = server
    _write(www / "labels.nii", gz=False)
    res = _resource(url=f"{base}/labels.nii")
    assert locate(res, Places(cache_dir=tmp_path / "c1", environ={}, offline=True)).state == "missing"
    assert locate(res, Places(cache_dir=tmp_path / "c2", environ={"ARBORSEG_OFFLINE": "1"})).state == "missing"
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()
    gone = _resource(url=f"{base}/nothing-here.nii")
    found = locate(gone, Places(cache_dir=tmp_path / "c3", environ={}))
    assert not found.usable and "download" in found.detail and "404" in found.detail


def test_require_names_the_resource_and_how(tmp_path):
    res = _resource()
    places = Places(atlas_dir=tmp_path / "atl", cache_dir=tmp_path / "cache", environ={}, offline=True)
    with pytest.raises(ResourceError) as exc:
        require({"preprocessing"}, places, manifest=[res])
    msg = str(exc.value)
    assert exc.value.exit_code == 4
    assert "test-atlas" in msg and res.path in msg
    assert str(tmp_path / "atl") in msg and str(tmp_path / "cache" / "atlases") in msg
    assert "--atlas-dir" in msg and "ARBORSEG_ATLAS_DIR" in msg and "arborseg-resources fetch" in msg
    assert "--offline" in msg
    # a stage that is not run does not need it
    assert require({"cerebellum"}, places, manifest=[res]) == {}


def test_mni_template_is_checked_by_digest(tmp_path):
    folder = tmp_path / "tpl-MNI152NLin6Asym"
    for resource in load_manifest():
        if resource.id in MANIFEST_TEMPLATES["MNI152NLin6Asym"].values():
            _write(tmp_path / resource.path, b"not the template")
    with pytest.raises(ResourceError, match="sha256"):
        resolve_template("MNI152NLin6Asym", places=Places(templateflow_home=tmp_path, environ={}, offline=True))
    assert folder.is_dir()


# --------------------------------------------------------------------------- arborseg-resources
def test_status_command(tmp_path, capsys):
    good = _resource()
    planned = _resource(id="later-atlas", path="later/atlas.nii.gz", needed_by="cerebellum")
    _write(tmp_path / "atl" / good.path)
    opts = cli.get_parser().parse_args(["status", "--atlas-dir", str(tmp_path / "atl"), "--json"])
    opts.cache_dir = None
    assert cli.run_status(opts, manifest=[good, planned]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["test-atlas"]["state"] == "ok" and rows["test-atlas"]["origin"] == "--atlas-dir"
    assert rows["later-atlas"]["state"] == "missing" and "planned" in rows["later-atlas"]["needed_by"]
    (tmp_path / "atl" / good.path).unlink()
    opts.json = False
    assert cli.run_status(opts, manifest=[good, planned]) == 4
    out = capsys.readouterr().out
    assert "MISSING" in out and "to provide it" in out


def test_fetch_command_fills_a_cache(tmp_path, server):
    www, base = server
    _write(www / "labels.nii", gz=False)
    mirror = tmp_path / "mirror"
    other = _resource(id="second", path="second/file.nii.gz", url=f"{base}/missing.nii")
    _write(mirror / "atlases" / other.path)
    manual = _resource(id="manual", path="m/m.nii.gz", fetch="manual", how="by hand")
    first = _resource(url=f"{base}/labels.nii")
    cache = tmp_path / "cache"
    opts = cli.get_parser().parse_args(["fetch", "--cache-dir", str(cache)])
    assert cli.run_fetch(opts, manifest=[first, other, manual]) == 4  # 'second' is not on the server
    assert (cache / "atlases" / first.path).is_file()
    opts = cli.get_parser().parse_args(["fetch", "--cache-dir", str(cache), "--from", str(mirror)])
    assert cli.run_fetch(opts, manifest=[other, manual]) == 0
    assert content_sha256(cache / "atlases" / other.path) == other.sha256
    assert not (cache / "atlases" / manual.path).exists()
