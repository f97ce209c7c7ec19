"""Generate ``boutiques.json`` (Boutiques schema 0.5) from ArborSeg's ``argparse`` parser.

Run from the repository root:

    python tools/make_boutiques.py            # (re)write boutiques.json
    python tools/make_boutiques.py --check    # exit 1 (with a diff) if boutiques.json is stale

Every input of the descriptor comes from one action of ``bids_app.cli.parser.get_parser()``: its
id is the action's ``dest``, its flag the first long option string, its type follows the action's
``type`` (``int`` -> Number integer, ``float`` -> Number, ``Path`` -> File, anything else ->
String), ``nargs='+'`` makes a list, ``choices`` become ``value-choices``. The tool version is
``bids_app._version.__version__``; the container image is tagged with it.

The parser is built in a neutral environment (no environment variables, an empty temporary working
folder), so the descriptor never depends on the machine that generates it. A default is written to
the descriptor only when it is a constant: defaults that change with an environment variable (the
parser is built under several made-up environments to find them) or with the working folder are
left out, and so are "absent" defaults (None, False, empty lists), because Boutiques passes every
``default-value`` on the command line.

What Boutiques cannot express, and what is written instead:

* ``-v/--verbose`` (``action="count"``, repeatable): a String input without a flag whose choices are
  the repeated short flag itself (``-v``, ``-vv``).
* ``--version`` / ``--list-models`` (print and exit): Flags; they produce none of the output files.
* ``-h/--help`` is left out.
* conflicts ``argparse`` checks outside mutually exclusive groups (``--no-seg`` with
  ``--parc-models``, checked in ``_Parser.parse_known_args``): found by parsing every pair of
  options with sample values, written as ``disables-inputs`` on both inputs. Mutually exclusive
  groups become ``groups`` with ``mutually-exclusive: true``.
* checks inside ``type`` functions (file exists, a JSON object, an octal umask) stay in ArborSeg;
  known numeric ranges are written as ``minimum``/``maximum`` (``NUMBER_BOUNDS``).
* a subject with sessions writes ``sub-<label>/ses-<label>/anat/``; the per-subject path templates
  describe the layout without sessions (glob patterns cannot make a folder level optional).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import re
import sys
import tempfile
import typing
from pathlib import Path, PurePath

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DESCRIPTOR = ROOT / "boutiques.json"
SCHEMA_VERSION = "0.5"
TOOL_NAME = "ArborSeg"
CONTAINER = {"type": "docker", "image": "arborseg/arborseg", "index": "docker.io"}
#: one participant of a 1 mm T1w: about 5 minutes on 2 cores with about 6 GB of memory
SUGGESTED_RESOURCES = {"cpu-cores": 2, "ram": 6, "walltime-estimate": 300}
TAGS = {
    "domain": ["neuroinformatics", "mri", "anatomical", "segmentation", "morphometry"],
    "bids-app": True,
}
#: levels of a counted flag (``-v``, ``-vv``) offered as choices
MAX_COUNT = 2
#: numeric ranges enforced by the ``type`` functions of the parser (checked by tests/cli/test_boutiques.py)
NUMBER_BOUNDS = {
    "_positive_int": {"minimum": 1},
    "_positive_float": {"minimum": 0, "exclusive-minimum": True},
    "_voxel_size": {"minimum": 0.5, "maximum": 3.0},
}
#: words spelled in capitals in input names
ACRONYMS = {"bids": "BIDS", "mc": "MC", "omp": "OMP", "gb": "GB", "nprocs": "Processes",
            "templateflow": "TemplateFlow"}
#: environments the parser is built under to find defaults that come from environment variables
_PROBE_VALUES = (None, "1", "0", "0027", "/arborseg-probe/folder")
_ABSENT = object()


# --------------------------------------------------------------------------------------- parser


class _ProbeEnviron(dict):
    """An ``os.environ`` stand-in where every variable is unset (``value=None``) or set to ``value``."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def __getitem__(self, key):
        if self.value is None:
            raise KeyError(key)
        return self.value

    def get(self, key, default=None):
        return default if self.value is None else self.value

    def __contains__(self, key):
        return self.value is not None


@contextlib.contextmanager
def _environment(value, cwd: Path):
    saved_env, saved_cwd = os.environ, os.getcwd()
    os.environ = _ProbeEnviron(value)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.environ = saved_env
        os.chdir(saved_cwd)


def _get_parser() -> argparse.ArgumentParser:
    from bids_app.cli.parser import get_parser

    return get_parser()


def build_parser(cwd: Path, env_value=None) -> argparse.ArgumentParser:
    """The parser as built with every environment variable unset (or set to ``env_value``) in ``cwd``."""
    with _environment(env_value, cwd):
        return _get_parser()


def variable_defaults(parser_factory=_get_parser) -> set[str]:
    """``dest`` of every action whose default changes with an environment variable or the working folder."""
    defaults = []
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        for cwd in (one, two):
            for value in _PROBE_VALUES:
                with _environment(value, Path(cwd)):
                    try:
                        defaults.append({a.dest: a.default for a in parser_factory()._actions})
                    except Exception:  # e.g. int(os.getenv(...)) of a made-up value: not a usable probe
                        if value is None:
                            raise
    return {dest for dest in defaults[0] if any(d.get(dest, _ABSENT) != defaults[0][dest] for d in defaults[1:])}


# ---------------------------------------------------------------------------------------- inputs


def input_id_of(dest: str) -> str:
    return re.sub(r"\W", "_", dest)


def input_id(action: argparse.Action) -> str:
    return input_id_of(action.dest)


def value_key(action: argparse.Action) -> str:
    return f"[{input_id(action).upper()}]"


def main_flag(action: argparse.Action) -> str:
    """The first long option string (``--work-dir`` of ``-w/--work-dir``), else the first one."""
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def action_kind(action: argparse.Action) -> str:
    """``help`` (left out), ``info`` (prints and exits), ``flag``, ``count`` or ``value``."""
    if isinstance(action, argparse._HelpAction):
        return "help"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        return "flag"
    if isinstance(action, argparse._CountAction):
        return "count"
    if action.nargs == 0 and action.default is argparse.SUPPRESS:
        return "info"  # --version, --list-models: print something and exit
    if type(action) is argparse._StoreAction or isinstance(action, argparse._ExtendAction):
        return "value"
    raise NotImplementedError(f"{'/'.join(action.option_strings) or action.dest}: {type(action).__name__} has no "
                              "Boutiques equivalent yet; extend tools/make_boutiques.py")


def _returns(func) -> object:
    """What a ``type=`` callable returns: the class itself, else its return annotation."""
    if isinstance(func, type):
        return func
    try:
        return typing.get_type_hints(func).get("return")
    except Exception:  # an annotation that cannot be resolved: treat the values as strings
        return None


def _decimal(func, cast) -> bool:
    """Whether ``func`` reads numbers written in decimal (``_umask`` reads octal text: a String)."""
    accepted = 0
    for text in ("1", "2", "3", "10", "100", "0.5", "1.5"):
        try:
            value = func(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        try:
            if value != cast(text):
                return False
        except ValueError:
            return False
        accepted += 1
    return accepted > 0


def input_type(action: argparse.Action) -> tuple[str, bool]:
    """(Boutiques type, integer) of a value action."""
    if action.choices is not None and all(isinstance(c, str) for c in action.choices):
        return "String", False
    returned = _returns(action.type) if action.type is not None else str
    if returned is int and (action.type is int or _decimal(action.type, int)):
        return "Number", True
    if returned is float and (action.type is float or _decimal(action.type, float)):
        return "Number", False
    if isinstance(returned, type) and issubclass(returned, PurePath):
        return "File", False
    return "String", False


def _name(action: argparse.Action) -> str:
    words = input_id(action).split("_")
    words = [ACRONYMS.get(w, w) for w in words]
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


def _description(action: argparse.Action, parser: argparse.ArgumentParser) -> str | None:
    text = action.help
    if isinstance(action, argparse._VersionAction) and text is None:
        text = "show the version and exit"
    if not text or text == argparse.SUPPRESS:
        return None
    if re.search(r"%\(\w+\)", text):
        text = text % {**vars(action), "prog": parser.prog}
    return text


def _default(action: argparse.Action, kind: str, btype: str, variable: set[str]):
    """The ``default-value`` of an input, or ``_ABSENT``."""
    default = action.default
    if kind != "value" or action.dest in variable or default in (None, argparse.SUPPRESS, "", [], ()):
        return _ABSENT
    values = list(default) if isinstance(default, (list, tuple)) else [default]
    out = []
    for value in values:
        if isinstance(value, str) and btype == "Number":
            value = action.type(value)
        if isinstance(value, bool):
            return _ABSENT
        if isinstance(value, PurePath):
            if not value.is_absolute():
                return _ABSENT  # relative to the working folder
            value = str(value)
        if btype == "Number" and not isinstance(value, (int, float)):
            return _ABSENT
        if btype in ("String", "File") and not isinstance(value, str):
            return _ABSENT  # e.g. a dict made by the type function: not expressible on a command line
        out.append(value)
    return out if isinstance(default, (list, tuple)) else out[0]


def make_input(action: argparse.Action, parser: argparse.ArgumentParser, variable: set[str]) -> dict:
    kind = action_kind(action)
    entry = {"id": input_id(action), "name": _name(action)}
    if kind in ("flag", "info"):
        entry["type"] = "Flag"
    elif kind == "count":
        entry["type"] = "String"
    else:
        btype, integer = input_type(action)
        entry["type"] = btype
    description = _description(action, parser)
    if kind == "count":
        short = next((s for s in action.option_strings if re.fullmatch(r"-\w", s)), None)
        if short is None:
            raise NotImplementedError(f"{main_flag(action)}: a counted option needs a short flag for Boutiques")
        levels = [short + short[1:] * n for n in range(MAX_COUNT)]
        description = (description or "") + f" (Boutiques: the value is the flag itself: {', '.join(levels)})"
    if description:
        entry["description"] = description
    entry["value-key"] = value_key(action)
    if action.option_strings and kind != "count":
        entry["command-line-flag"] = main_flag(action)
    entry["optional"] = (bool(action.option_strings) and not action.required) or kind in ("flag", "info", "count")
    if kind == "value":
        nargs = action.nargs
        if nargs in ("+", "*") or isinstance(nargs, int) and nargs > 1:
            entry["list"] = True
            if nargs == "+":
                entry["min-list-entries"] = 1
            elif isinstance(nargs, int):
                entry["min-list-entries"] = entry["max-list-entries"] = nargs
        if entry["type"] == "Number":
            if integer:
                entry["integer"] = True
            bounds = NUMBER_BOUNDS.get(getattr(action.type, "__name__", ""), {})
            entry.update(bounds)
        if action.choices is not None:
            entry["value-choices"] = [c if entry["type"] == "Number" else str(c) for c in action.choices]
        default = _default(action, kind, entry["type"], variable)
        if default is not _ABSENT:
            entry["default-value"] = default
    elif kind == "count":
        entry["value-choices"] = levels
    return entry


# ------------------------------------------------------------------------------------- conflicts


def _sample_values(action: argparse.Action, existing_file: Path) -> list[str]:
    """Command-line words that set ``action`` to a value its ``type`` accepts."""
    kind = action_kind(action)
    if kind in ("flag", "info"):
        return [action.option_strings[0]]
    if kind == "count":
        return [action.option_strings[0]]
    if action.choices is not None:
        value = str(next(iter(action.choices)))
    else:
        value = None
        for candidate in ("1", "0022", "{}", str(existing_file), "x"):
            if action.type is None:
                value = candidate
                break
            try:
                action.type(candidate)
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                continue
            value = candidate
            break
        if value is None:
            raise NotImplementedError(f"{action.dest}: no sample value found to probe option conflicts")
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [*action.option_strings[:1], *[value] * count]


def _parses(parser: argparse.ArgumentParser, words: list[str]) -> bool:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(words)
        except SystemExit:
            return False
    return True


def option_conflicts(parser: argparse.ArgumentParser) -> set[tuple[str, str]]:
    """Pairs of option ``dest`` that parse alone but not together (mutually exclusive groups and
    conflicts the parser checks by itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        existing = Path(tmp) / "sample.json"
        existing.write_text("{}")
        positionals = [w for a in parser._actions if not a.option_strings for w in _sample_values(a, existing)]
        options = [a for a in parser._actions if a.option_strings and action_kind(a) not in ("help", "info")]
        samples = {a.dest: _sample_values(a, existing) for a in options}
        usable = [a for a in options if _parses(parser, positionals + samples[a.dest])]
        conflicts = set()
        for i, one in enumerate(usable):
            for two in usable[i + 1:]:
                if not _parses(parser, positionals + samples[one.dest] + samples[two.dest]):
                    conflicts.add((one.dest, two.dest))
    return conflicts


# ---------------------------------------------------------------------------------------- groups


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()


def make_groups(parser: argparse.ArgumentParser) -> list[dict]:
    groups = []
    for group in parser._action_groups:
        members = [input_id(a) for a in group._group_actions if action_kind(a) != "help"]
        if not members:
            continue
        if group is parser._positionals:
            title = "positional arguments"
        elif group is parser._optionals:
            title = "general options"
        else:
            title = group.title
        entry = {"id": "group_" + _slug(title), "name": title}
        if group.description:
            entry["description"] = group.description
        entry["members"] = members
        groups.append(entry)
    for mutex in parser._mutually_exclusive_groups:
        members = [input_id(a) for a in mutex._group_actions]
        entry = {"id": "exclusive_" + "_or_".join(members),
                 "name": "one of " + ", ".join(main_flag(a) for a in mutex._group_actions),
                 "members": members, "mutually-exclusive": True}
        if mutex.required:
            entry["one-is-required"] = True
        groups.append(entry)
    return groups


# --------------------------------------------------------------------------------------- outputs


def make_outputs(output_key: str) -> list[dict]:
    """The main derivatives; per-subject templates describe the layout without sessions."""
    from bids_app.bids import seg_entity
    from bids_app.cli.group import WHOLEBRAIN_SEG, qc_table_name

    wholebrain, parc = seg_entity("aseg"), seg_entity("dkt-aseg")
    anat = f"{output_key}/sub-*/anat/sub-*"
    session_note = " (sub-<label>/ses-<label>/anat/ for datasets with sessions)"

    def out(id_, name, template, description, *, optional, per_subject=False):
        entry = {"id": id_, "name": name, "description": description, "path-template": template,
                 "optional": optional}
        if per_subject:
            entry["list"] = True
        return entry

    return [
        out("dataset_description", "Derivatives description", f"{output_key}/dataset_description.json",
            "dataset_description.json of the derivatives (DatasetType derivative, GeneratedBy with the version)",
            optional=False),
        out("subject_reports", "Subject reports", f"{output_key}/sub-*.html",
            "HTML report of each participant (and session) with its QC figures", optional=False, per_subject=True),
        out("preproc_t1w", "Preprocessed T1w", f"{anat}_desc-preproc_T1w.nii.gz",
            "conformed, denoised, bias-corrected, intensity-normalised T1w of each participant" + session_note,
            optional=False, per_subject=True),
        out("brain_mask", "Brain mask", f"{anat}_desc-brain_mask.nii.gz",
            "brain mask in the conformed T1w space" + session_note, optional=False, per_subject=True),
        out("wholebrain_dseg", "Whole-brain segmentation", f"{anat}_seg-{wholebrain}_dseg.nii.gz",
            "whole-brain segmentation (aseg protocol) of each participant; not with --no-seg nor without "
            "installed whole-brain models" + session_note, optional=True, per_subject=True),
        out("wholebrain_morph", "Whole-brain morphometry", f"{anat}_seg-{wholebrain}_morph.tsv",
            "volume of every structure of the whole-brain segmentation (mm3, with QC flags)" + session_note,
            optional=True, per_subject=True),
        out("parcellation_dseg", "Cortical parcellation", f"{anat}_seg-{parc}_dseg.nii.gz",
            "cortical parcellation (dkt-aseg protocol); not with --no-seg/--no-parc nor without installed "
            "parcellation models" + session_note, optional=True, per_subject=True),
        out("group_table", "Group table", f"{output_key}/group.tsv",
            "group level: one row per participant (status, ICV, brain volume, registration quality, runtime)",
            optional=True),
        out("group_report", "Group report", f"{output_key}/group.html",
            "group level: HTML report linking every participant's report", optional=True),
        out("group_volumes", "Group volumes", f"{output_key}/group_volumes_{wholebrain}.tsv",
            "group level: whole-brain structure volumes, one row per participant", optional=True),
        out("group_seg_qc", "Group segmentation QC", f"{output_key}/{qc_table_name(WHOLEBRAIN_SEG)}",
            "group level: whole-brain segmentation QC (MC-dropout variability) per participant", optional=True),
    ]


def error_codes(epilog: str | None) -> list[dict]:
    """The non-zero exit codes listed under ``exit codes:`` in the parser's epilog."""
    codes, current = [], None
    for line in (epilog or "").splitlines():
        match = re.match(r"^\s+(\d+)\s{2,}(\S.*)$", line)
        if match:
            current = {"code": int(match.group(1)), "description": match.group(2).strip()}
            codes.append(current)
        elif current is not None and line.strip() and line.startswith(" " * 4):
            current["description"] += " " + line.strip()
        else:
            current = None
    return [c for c in codes if c["code"] != 0]


# ------------------------------------------------------------------------------------ descriptor


def build_descriptor() -> dict:
    from bids_app._version import __version__

    variable = variable_defaults()
    with tempfile.TemporaryDirectory() as cwd:
        parser = build_parser(Path(cwd))
        actions = [a for a in parser._actions if action_kind(a) != "help"]
        inputs = [make_input(a, parser, variable) for a in actions]
        conflicts = option_conflicts(parser)
    mutex_pairs = {frozenset((a.dest, b.dest)) for g in parser._mutually_exclusive_groups
                   for a in g._group_actions for b in g._group_actions if a is not b}
    by_dest = {a.dest: e for a, e in zip(actions, inputs)}
    for one, two in sorted(conflicts):
        if frozenset((one, two)) in mutex_pairs:
            continue  # already a mutually-exclusive group
        by_dest[one].setdefault("disables-inputs", []).append(input_id_of(two))
        by_dest[two].setdefault("disables-inputs", []).append(input_id_of(one))
    positional = {a.dest: a for a in actions if not a.option_strings}
    if "output_dir" not in positional:
        raise RuntimeError("the parser has no output_dir positional: update make_outputs()")
    command = " ".join([parser.prog, *(value_key(a) for a in actions if not a.option_strings),
                        *(value_key(a) for a in actions if a.option_strings)])
    descriptor = {
        "name": TOOL_NAME,
        "tool-version": __version__,
        "schema-version": SCHEMA_VERSION,
        "description": parser.description,
        "command-line": command,
        "container-image": {**CONTAINER, "image": f"{CONTAINER['image']}:{__version__}"},
        "inputs": inputs,
        "groups": make_groups(parser),
        "output-files": make_outputs(value_key(positional["output_dir"])),
        "error-codes": error_codes(parser.epilog),
        "suggested-resources": dict(SUGGESTED_RESOURCES),
        "tags": TAGS,
        "custom": {"generated-by": "tools/make_boutiques.py from bids_app/cli/parser.py; do not edit by hand"},
    }
    ids = [x["id"] for key in ("inputs", "groups", "output-files") for x in descriptor[key]]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RuntimeError(f"ids used twice in the descriptor: {duplicates}")
    return descriptor


def render(descriptor: dict) -> str:
    return json.dumps(descriptor, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--check", action="store_true",
                     help="do not write; exit 1 with a diff if the descriptor differs from the generated one")
    cli.add_argument("-o", "--output", type=Path, default=DESCRIPTOR, help="descriptor path (default: %(default)s)")
    args = cli.parse_args(argv)
    text = render(build_descriptor())
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current == text:
            print(f"{args.output}: up to date")
            return 0
        diff = difflib.unified_diff(current.splitlines(keepends=True), text.splitlines(keepends=True),
                                    fromfile=f"{args.output} (committed)", tofile=f"{args.output} (generated)")
        sys.stdout.writelines(diff)
        print(f"\n{args.output} is stale: run `python tools/make_boutiques.py` and commit the result",
              file=sys.stderr)
        return 1
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
