"""``arborseg-resources``: the status of every external resource, and filling a cache with them.

``arborseg-resources status`` lists each resource of the manifest (``bids_app/data/resources.json``),
where it was found and whether its sha256 matches; the exit code is 4 when a resource the pipeline
needs is not available. ``arborseg-resources fetch --cache-dir DIR`` downloads (or copies, with
``--from``) every resource into ``DIR`` and verifies it: the container build runs it, and on a
cluster without internet it pre-fills a cache from a machine that has it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import EXIT_OK, EXIT_RESOURCE, ArborSegError
from ..resources import GROUPS, PIPELINE_STAGES, Places, fetch, how_to_provide, load_manifest, locate
from .parser import env_path

LOGGER = logging.getLogger("arborseg")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arborseg-resources", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--templateflow-home", type=Path, default=env_path("TEMPLATEFLOW_HOME"), metavar="DIR",
                        help="TemplateFlow folder (default: $TEMPLATEFLOW_HOME)")
    common.add_argument("--atlas-dir", type=Path, default=env_path("ARBORSEG_ATLAS_DIR"), metavar="DIR",
                        help="cerebellar atlas folder (default: $ARBORSEG_ATLAS_DIR)")
    common.add_argument("-v", "--verbose", action="store_true", help="log every step")
    status = sub.add_parser("status", parents=[common], help="print where each resource is found (no download)")
    status.add_argument("--cache-dir", type=Path, default=env_path("ARBORSEG_CACHE_DIR"), metavar="DIR",
                        help="resource cache (default: $ARBORSEG_CACHE_DIR)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    get = sub.add_parser("fetch", parents=[common], help="download (or copy) every resource into a cache and "
                                                          "verify its sha256")
    get.add_argument("--cache-dir", type=Path, default=env_path("ARBORSEG_CACHE_DIR"), metavar="DIR",
                     required=not os.getenv("ARBORSEG_CACHE_DIR"),
                     help="cache folder to fill (default: $ARBORSEG_CACHE_DIR)")
    get.add_argument("--from", dest="mirror", type=Path, metavar="DIR",
                     help="copy from a local folder laid out like the cache (templateflow/, atlases/) instead of "
                          "downloading")
    return parser


def _size(path: Path | None) -> str:
    if path is None:
        return ""
    mb = path.stat().st_size / 1e6
    return f"{mb:.1f} MB" if mb >= 0.1 else f"{path.stat().st_size} B"


def status_rows(places: Places, manifest=None) -> list[dict]:
    rows = []
    for resource in manifest if manifest is not None else load_manifest():
        found = locate(resource, places, download=False)
        needed = resource.needed_by in PIPELINE_STAGES
        state = found.state if found.state != "missing" else ("MISSING" if needed else "missing")
        rows.append({"id": resource.id, "needed_by": resource.needed_by + ("" if needed else " (planned)"),
                     "state": state, "path": str(found.path or ""), "origin": found.origin,
                     "size": _size(found.path), "licence": resource.licence, "detail": found.detail,
                     "how": "" if found.usable else how_to_provide(resource), "needed": needed})
    return rows


def _print_table(rows: list[dict]) -> None:
    columns = ("id", "needed_by", "state", "origin", "path")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in columns)]
    for row in rows:
        lines.append("  ".join(row[c].ljust(widths.get(c, 0)) for c in columns).rstrip())
    sys.stdout.write("\n".join(lines) + "\n")
    for row in rows:
        if row["state"] in ("MISSING", "mismatch") or (row["detail"] and row["state"] != "ok"):
            sys.stdout.write(f"\n{row['id']}: {row['detail'] or 'not found'}\n")
            if row["how"]:
                sys.stdout.write(f"  to provide it: {row['how']}\n")


def run_status(opts, manifest=None) -> int:
    places = Places(templateflow_home=opts.templateflow_home, atlas_dir=opts.atlas_dir, cache_dir=opts.cache_dir,
                    offline=True)
    rows = status_rows(places, manifest)
    if opts.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        _print_table(rows)
    missing = [r["id"] for r in rows if r["needed"] and r["state"] not in ("ok", "mismatch")]
    if missing:
        LOGGER.error("%d resource(s) the pipeline needs are missing: %s", len(missing), ", ".join(missing))
        return EXIT_RESOURCE
    return EXIT_OK


def run_fetch(opts, manifest=None) -> int:
    cache = opts.cache_dir.expanduser().resolve()
    places = Places(templateflow_home=opts.templateflow_home, atlas_dir=opts.atlas_dir, cache_dir=cache)
    failed, done = [], 0
    for resource in manifest if manifest is not None else load_manifest():
        dest = cache / GROUPS[resource.group][2] / resource.path
        if resource.fetch != "auto":
            LOGGER.info("%s: not fetched (%s)", resource.id, resource.how)
            continue
        found = locate(resource, places, download=False)
        try:
            if found.state == "ok" and found.path == dest:
                LOGGER.info("%s: already in the cache", resource.id)
            elif found.state == "ok":
                fetch(resource, dest, source=str(found.path))
            elif opts.mirror:
                fetch(resource, dest, source=str(opts.mirror / GROUPS[resource.group][2] / resource.path))
            else:
                fetch(resource, dest)
            done += 1
        except (ArborSegError, OSError) as exc:
            LOGGER.error("%s: %s", resource.id, exc)
            failed.append(resource.id)
    LOGGER.info("cache %s: %d resource(s) in place, %d failed", cache, done, len(failed))
    return EXIT_RESOURCE if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from .run import setup_logging

    opts = get_parser().parse_args(argv)
    setup_logging(1 if opts.verbose else 0)
    return run_status(opts) if opts.command == "status" else run_fetch(opts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
