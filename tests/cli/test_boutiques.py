"""``boutiques.json``: generated from the parser by ``tools/make_boutiques.py``, in step with it (checked
here independently of the generator), valid for Boutiques, and runnable with ``bosh exec launch``."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePath

import pytest

from bids_app._version import __version__
from bids_app.cli.parser import get_parser

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR = ROOT / "boutiques.json"
POSITIONAL = ["bids", "out", "participant"]


def _tool():
    spec = importlib.util.spec_from_file_location("make_boutiques", ROOT / "tools" / "make_boutiques.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bosh():
    """``boutiques.bosh`` (the Python API of the ``bosh`` command), or skip."""
    pytest.importorskip("boutiques", reason="boutiques is not installed (pip install boutiques)")
    from boutiques import bosh

    return bosh


def _bosh_executable() -> str | None:
    local = Path(sys.executable).parent / "bosh"
    return str(local) if local.is_file() else shutil.which("bosh")


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


@pytest.fixture(scope="module")
def inputs(descriptor) -> dict:
    return {i["id"]: i for i in descriptor["inputs"]}


def _actions(parser=None) -> list[argparse.Action]:
    parser = parser or get_parser()
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _parse(words, parser=None):
    """The namespace, or None when the parser refuses ``words`` (usage error)."""
    parser = parser or get_parser()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(words)
        except SystemExit:
            return None


# ------------------------------------------------------------------------ generated, up to date


def test_committed_descriptor_is_the_generated_one():
    tool = _tool()
    assert DESCRIPTOR.read_text() == tool.render(tool.build_descriptor()), (
        "boutiques.json differs from what the parser generates: run `python tools/make_boutiques.py`")


def test_check_mode_reports_a_stale_descriptor(tmp_path, capsys):
    tool = _tool()
    copy = tmp_path / "boutiques.json"
    generated = tool.render(tool.build_descriptor())
    copy.write_text(generated)
    assert tool.main(["--check", "--output", str(copy)]) == 0
    copy.write_text(generated.replace('"default-value": 42', '"default-value": 43'))
    assert tool.main(["--check", "--output", str(copy)]) == 1
    captured = capsys.readouterr()
    assert '-      "default-value": 43' in captured.out and '+      "default-value": 42' in captured.out
    assert "make_boutiques.py" in captured.err


def test_versions_come_from_one_source(descriptor):
    assert descriptor["tool-version"] == __version__
    assert descriptor["container-image"]["image"] == f"arborseg/arborseg:{__version__}"
    assert descriptor["container-image"]["type"] == "docker"
    assert descriptor["schema-version"] == "0.5"
    assert _parse(["--version"]) is None  # prints "ArborSeg <version>" and exits
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        get_parser().parse_args(["--version"])
    assert out.getvalue().strip() == f"ArborSeg {__version__}"


def test_the_environment_does_not_leak_into_the_descriptor(monkeypatch, tmp_path):
    tool = _tool()
    clean = tool.build_descriptor()
    for name, value in {"ARBORSEG_OFFLINE": "1", "ARBORSEG_UMASK": "0077", "TEMPLATEFLOW_HOME": str(tmp_path),
                        "ARBORSEG_ATLAS_DIR": str(tmp_path), "ARBORSEG_CACHE_DIR": str(tmp_path),
                        "ARBORSEG_LIBRARY_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert tool.build_descriptor() == clean
    assert str(tmp_path) not in tool.render(clean)


# ---------------------------------------------- the descriptor against the parser (independent)


def _expected_type(action: argparse.Action, tmp_path: Path) -> tuple[str, bool]:
    """Boutiques type of a value option, found by parsing sample values with the real parser."""
    if action.choices is not None and all(isinstance(c, str) for c in action.choices):
        return "String", False
    existing = tmp_path / "sample.json"
    existing.write_text("{}")
    results = {}
    for text in ("1", "2", "10", "0022", "1.5", "{}", str(existing), "MNI152NLin6Asym"):
        words = [*POSITIONAL, action.option_strings[0], text] if action.option_strings else [text, "out", "group"]
        opts = _parse(words)
        if opts is not None:
            value = getattr(opts, action.dest)
            results[text] = value[0] if isinstance(value, list) else value
    assert results, f"{action.dest}: no sample value parses"
    values = list(results.values())
    if all(isinstance(v, PurePath) for v in values):
        return "File", False
    if all(isinstance(v, bool) is False and isinstance(v, int) for v in values):
        if all(v == int(t) for t, v in results.items() if re.fullmatch(r"\d+", t)):
            return "Number", True
        return "String", False  # numbers written in another base (--umask 0022)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "Number", False
    return "String", False


def _env_variables_changing_default(action: argparse.Action, monkeypatch) -> list[str]:
    """The ``$VARIABLES`` named in the help that change the parser's default of ``action``."""
    found = []
    for name in re.findall(r"\$([A-Z][A-Z0-9_]+)", action.help or ""):
        seen = []
        for value in (None, "1", "0027", "/some/folder"):
            with monkeypatch.context() as m:
                if value is None:
                    m.delenv(name, raising=False)
                else:
                    m.setenv(name, value)
                seen.append(next(a.default for a in get_parser()._actions if a.dest == action.dest))
        if any(s != seen[0] for s in seen[1:]):
            found.append(name)
    return found


def test_every_parser_action_has_its_input_and_back(inputs):
    actions = _actions()
    assert sorted(inputs) == sorted(a.dest for a in actions)
    flags = [i["command-line-flag"] for i in inputs.values() if "command-line-flag" in i]
    assert len(flags) == len(set(flags))
    for action in actions:
        entry = inputs[action.dest]
        if action.option_strings and "command-line-flag" in entry:
            assert entry["command-line-flag"] in action.option_strings, action.dest
        elif action.option_strings:
            assert isinstance(action, argparse._CountAction), f"{action.dest}: an option without its flag"
        else:
            assert entry["optional"] is False and action.nargs is None, action.dest


def test_inputs_match_the_parser(inputs, tmp_path, monkeypatch):
    for action in _actions():
        entry = inputs[action.dest]
        where = action.dest
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse._StoreConstAction, argparse._VersionAction)) or (
                action.nargs == 0 and action.default is argparse.SUPPRESS):
            assert entry["type"] == "Flag" and entry["optional"] is True, where
            assert "default-value" not in entry and "list" not in entry, where
            continue
        if isinstance(action, argparse._CountAction):
            # a repeatable flag: the value is the repeated flag itself (-v, -vv)
            assert entry["type"] == "String" and "command-line-flag" not in entry, where
            for level, choice in enumerate(entry["value-choices"], start=1):
                assert getattr(_parse([*POSITIONAL, choice]), action.dest) == level, choice
            continue
        btype, integer = _expected_type(action, tmp_path)
        assert (entry["type"], entry.get("integer", False)) == (btype, integer), where
        is_list = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1
        assert entry.get("list", False) == is_list, where
        if action.nargs == "+":
            assert entry["min-list-entries"] == 1, where
        assert entry["optional"] == (bool(action.option_strings) and not action.required), where
        if action.choices is None:
            assert "value-choices" not in entry, where
        else:
            assert entry["value-choices"] == [c if btype == "Number" else str(c) for c in action.choices], where
        # defaults: the parser's own constant default, or none (absent, or it comes from the environment)
        default = action.default
        if "default-value" in entry:
            value = entry["default-value"]
            expected = action.type(default) if isinstance(default, str) and btype == "Number" else default
            assert value == expected and not _env_variables_changing_default(action, monkeypatch), where
            words = [*POSITIONAL, entry["command-line-flag"], *map(str, value if is_list else [value])]
            assert getattr(_parse(words), action.dest) == getattr(_parse(POSITIONAL), action.dest), where
        elif default not in (None, False, [], (), "", argparse.SUPPRESS):
            assert _env_variables_changing_default(action, monkeypatch), (
                f"{where}: the parser's default {default!r} is missing from the descriptor")


def test_number_bounds_are_those_of_the_parser(inputs):
    checked = 0
    for action in _actions():
        entry = inputs[action.dest]
        if entry["type"] != "Number":
            continue
        step = 1 if entry.get("integer") else 0.01

        def ok(value):
            return _parse([*POSITIONAL, entry["command-line-flag"], str(value)]) is not None

        if "minimum" in entry:
            low = entry["minimum"]
            assert ok(low) != bool(entry.get("exclusive-minimum")), action.dest
            assert not ok(low - step), action.dest
            if entry.get("exclusive-minimum"):
                assert ok(low + step), action.dest
            checked += 1
        else:
            assert ok(-1000), f"{action.dest}: the parser has a lower bound the descriptor lacks"
        if "maximum" in entry:
            high = entry["maximum"]
            assert ok(high) != bool(entry.get("exclusive-maximum")) and not ok(high + step), action.dest
        else:
            assert ok(10**6), f"{action.dest}: the parser has an upper bound the descriptor lacks"
    assert checked >= 3


def test_groups_mirror_the_parser(descriptor):
    parser = get_parser()
    groups = descriptor["groups"]
    plain = [tuple(g["members"]) for g in groups if not g.get("mutually-exclusive")]
    expected = [tuple(a.dest for a in g._group_actions if not isinstance(a, argparse._HelpAction))
                for g in parser._action_groups]
    assert plain == [e for e in expected if e]
    named = {g["name"] for g in groups}
    assert {g.title for g in parser._action_groups if g not in (parser._positionals, parser._optionals)} <= named
    exclusive = {frozenset(g["members"]): g.get("one-is-required", False)
                 for g in groups if g.get("mutually-exclusive")}
    assert exclusive == {frozenset(a.dest for a in g._group_actions): g.required
                         for g in parser._mutually_exclusive_groups}


def test_declared_conflicts_are_real(inputs):
    pairs = {frozenset((i, d)) for i, entry in inputs.items() for d in entry.get("disables-inputs", [])}
    assert frozenset(("no_seg", "parc_models")) in pairs  # checked by _Parser, not by an argparse group

    def words(dest):
        entry = inputs[dest]
        return [entry["command-line-flag"]] + ([] if entry["type"] == "Flag" else ["x.json"])

    for pair in pairs:
        one, two = sorted(pair)
        assert two in inputs[one]["disables-inputs"] and one in inputs[two]["disables-inputs"], pair
        assert _parse([*POSITIONAL, *words(one)]) is not None and _parse([*POSITIONAL, *words(two)]) is not None
        assert _parse([*POSITIONAL, *words(one), *words(two)]) is None, pair


def test_command_line_and_outputs(descriptor, inputs):
    parser = get_parser()
    command = descriptor["command-line"].split()
    assert command[0] == parser.prog
    assert sorted(command[1:]) == sorted(i["value-key"] for i in inputs.values())
    positional = [a.dest for a in parser._actions if not a.option_strings]
    assert command[1:1 + len(positional)] == [inputs[d]["value-key"] for d in positional]
    outputs = {o["id"]: o for o in descriptor["output-files"]}
    assert all(o["path-template"].startswith("[OUTPUT_DIR]/") for o in outputs.values())
    required = {o["id"] for o in outputs.values() if not o["optional"]}
    assert {"dataset_description", "subject_reports", "preproc_t1w"} <= required
    assert all(o["optional"] for k, o in outputs.items() if k.startswith("group"))
    assert {"wholebrain_dseg", "wholebrain_morph", "group_table", "group_volumes"} <= set(outputs)
    resources = descriptor["suggested-resources"]
    assert resources["cpu-cores"] >= 1 and resources["ram"] > 0 and resources["walltime-estimate"] > 0
    codes = {c["code"] for c in descriptor["error-codes"]}
    assert {1, 2, 3, 4} <= codes and 0 not in codes


# ------------------------------------------------------------------------------ Boutiques itself


def test_bosh_validate():
    bosh = _bosh()
    executable = _bosh_executable()
    if executable:  # what CI runs
        result = subprocess.run([executable, "validate", str(DESCRIPTOR)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    assert bosh(["validate", str(DESCRIPTOR)]) is None


def _phantom_invocation(root: Path, bids: Path, templateflow: Path, seg_model: Path, parc_model: Path) -> dict:
    return {"bids_dir": str(bids), "output_dir": str(root / "out"), "analysis_level": "participant",
            "work_dir": str(root / "work"), "template": "ArborSegPhantom", "templateflow_home": str(templateflow),
            "voxel_size": 2, "nprocs": 2, "mc_samples": 2, "seg_models": [str(seg_model)],
            "parc_models": [str(parc_model)]}


def test_phantom_invocation_is_valid_and_parses(tmp_path):
    bosh = _bosh()
    invocation = _phantom_invocation(tmp_path, tmp_path / "bids", tmp_path / "tf", tmp_path / "m" / "seg.json",
                                     tmp_path / "m" / "parc.json")
    invocation["verbose"] = "-vv"
    path = tmp_path / "invocation.json"
    path.write_text(json.dumps(invocation))
    assert bosh(["invocation", str(DESCRIPTOR), "-i", str(path)]) is None
    simulated = bosh(["exec", "simulate", str(DESCRIPTOR), "-i", str(path)])
    words = shlex.split(simulated.shell_command)
    assert words[0] == "arborseg"
    opts = get_parser().parse_args(words[1:])  # the command bosh builds is one ArborSeg accepts
    assert (opts.bids_dir, opts.output_dir, opts.analysis_level) == (tmp_path / "bids", tmp_path / "out",
                                                                     "participant")
    assert opts.template == "ArborSegPhantom" and opts.voxel_size == 2.0 and opts.nprocs == 2
    assert opts.mc_samples == 2 and opts.verbose == 2 and opts.work_dir == tmp_path / "work"
    assert opts.seg_models == [tmp_path / "m" / "seg.json"] and opts.parc_models == [tmp_path / "m" / "parc.json"]
    assert opts.random_seed == 42 and opts.device == "auto"  # defaults bosh adds


def test_invalid_invocations_are_refused(descriptor, tmp_path):
    # the schema bosh validates invocations with (its error report crashes on some refusals with recent
    # jsonschema releases, so the verdict is read directly)
    _bosh()
    import jsonschema
    from boutiques import generateInvocationSchema
    from boutiques.localExec import addDefaultValues

    validator = jsonschema.Draft4Validator(generateInvocationSchema(json.loads(json.dumps(descriptor))))
    base = _phantom_invocation(tmp_path, tmp_path / "bids", tmp_path / "tf", tmp_path / "s.json", tmp_path / "p.json")

    def valid(**changes):
        invocation = {**base, **changes}
        return validator.is_valid(addDefaultValues(descriptor, {k: v for k, v in invocation.items()
                                                                if v is not None}))

    assert valid() and valid(no_seg=False) and valid(verbose="-v")
    assert not valid(no_seg=True)  # with --seg-models (mutually exclusive group)
    assert not valid(seg_models=None, no_seg=True)  # with --parc-models (checked by _Parser)
    assert valid(seg_models=None, parc_models=None, no_seg=True)
    assert not valid(no_parc=True) and valid(parc_models=None, no_parc=True)
    assert not valid(voxel_size=4) and not valid(nprocs=0) and not valid(mc_samples=1.5)
    assert not valid(analysis_level="session") and not valid(verbose="-vvvvv") and not valid(device="tpu")
    assert not valid(output_dir=None)


# ------------------------------------------------------------------ bosh exec launch (minutes)


@pytest.mark.e2e
def test_bosh_exec_launch_runs_the_phantom_demo(tmp_path, phantom_templateflow):
    _bosh()
    executable = _bosh_executable()
    if executable is None:
        pytest.skip("the bosh command is not on PATH")
    from bids_app.core.phantom import write_demo_dataset
    from tests.conftest import tiny_parcellation_checkpoint, tiny_wholebrain_checkpoint

    bids = write_demo_dataset(tmp_path / "bids", n_subjects=1, voxel_size=2.0, seed=3)
    seg = tiny_wholebrain_checkpoint(tmp_path / "models" / "tiny-wholebrain")
    parc = tiny_parcellation_checkpoint(tmp_path / "models" / "tiny-parc")
    invocation = _phantom_invocation(tmp_path, bids, phantom_templateflow, seg, parc)
    (tmp_path / "participant.json").write_text(json.dumps(invocation))
    (tmp_path / "group.json").write_text(json.dumps({"bids_dir": str(bids), "output_dir": invocation["output_dir"],
                                                     "analysis_level": "group"}))
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "NIPYPE_NO_ET": "1", "ARBORSEG_OFFLINE": "1"}
    descriptor = json.loads(DESCRIPTOR.read_text())
    out = Path(invocation["output_dir"])

    def launch(name):
        t0 = time.perf_counter()
        result = subprocess.run([executable, "exec", "launch", "--no-container", "--skip-data-collection",
                                 str(DESCRIPTOR), str(tmp_path / name)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        return time.perf_counter() - t0, result.stdout

    seconds, log = launch("participant.json")
    assert "Missing files\n\t" not in log, log[-3000:]
    for output in descriptor["output-files"]:
        found = sorted(out.glob(output["path-template"].replace("[OUTPUT_DIR]/", "")))
        if not output["optional"]:
            assert found, f"{output['id']}: {output['path-template']} was not written"
        elif not output["id"].startswith("group"):  # models were given: the segmentation outputs too
            assert found, output["id"]
    generated_by = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert generated_by["Version"] == descriptor["tool-version"] == __version__
    launch("group.json")
    for output in descriptor["output-files"]:
        assert list(out.glob(output["path-template"].replace("[OUTPUT_DIR]/", ""))), output["id"]
    print(f"bosh exec launch, participant level: {seconds:.0f} s")
