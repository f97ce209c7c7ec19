"""--plugin/--plugin-args: the Nipype plugin and arguments a run uses, how the option is parsed, and how
the SLURMGraph jobs are followed (with stand-in squeue/scancel commands; no SLURM needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bids_app.cli import participant
from bids_app.cli.parser import PLUGINS, get_parser
from bids_app.cli.participant import execution_plugin
from bids_app.cli.run import build_config
from bids_app.config import RunConfig
from bids_app.errors import EXIT_USAGE


def _config(**kwargs) -> RunConfig:
    return RunConfig(bids_dir=Path("/data/bids"), output_dir=Path("/data/out"), analysis_level="participant",
                     work_dir=Path("/scratch/work"), **kwargs)


def callback(node, status):  # a stand-in for StageTimer
    pass


# ------------------------------------------------------------------------------------ execution_plugin
def test_default_is_multiproc_with_nprocs_and_memory():
    assert execution_plugin(_config(nprocs=4, mem_gb=8.0), callback) == (
        "MultiProc", {"n_procs": 4, "raise_insufficient": False, "memory_gb": 8.0, "status_callback": callback})
    name, args = execution_plugin(_config(nprocs=3))
    assert name == "MultiProc" and args == {"n_procs": 3, "raise_insufficient": False}  # no --mem-gb: no bound


def test_one_process_is_linear():
    assert execution_plugin(_config(nprocs=1), callback) == ("Linear", {"status_callback": callback})
    assert execution_plugin(_config(nprocs=1)) == ("Linear", {})
    # --plugin MultiProc with --nprocs 1 is what was asked for
    assert execution_plugin(_config(nprocs=1, plugin="MultiProc"))[1]["n_procs"] == 1


def test_graph_plugins_get_no_status_callback():
    name, args = execution_plugin(_config(nprocs=4, mem_gb=8.0, plugin="SLURMGraph"), callback)
    # no MultiProc arguments, and the flag whose absence breaks nipype's SLURMGraph plugin
    assert name == "SLURMGraph" and args == {"dont_resubmit_completed_jobs": False}
    # SGEGraph/PBSGraph cannot be followed: not offered at all
    from bids_app.cli.parser import PLUGINS

    assert "SGEGraph" not in PLUGINS and "PBSGraph" not in PLUGINS


def test_step_batch_plugins_report_progress_from_this_process():
    # SLURM, SGE, PBS, ... run each step as a job but call status_callback here
    for name in ("SLURM", "SGE", "PBS", "LSF", "Condor"):
        assert execution_plugin(_config(nprocs=4, plugin=name), callback) == (name, {"status_callback": callback})


def test_user_arguments_override_the_defaults():
    name, args = execution_plugin(_config(nprocs=4, mem_gb=8.0, plugin_args={"n_procs": 1, "maxtasksperchild": 5}),
                                  callback)
    assert name == "MultiProc" and args["n_procs"] == 1 and args["maxtasksperchild"] == 5
    assert args["memory_gb"] == 8.0 and args["status_callback"] is callback
    user = {"dont_resubmit_completed_jobs": True, "sbatch_args": "-p short --mem 8G"}
    assert execution_plugin(_config(plugin="SLURMGraph", plugin_args=user)) == ("SLURMGraph", user)


def test_every_plugin_offered_exists_in_nipype():
    from nipype.pipeline import plugins

    for name in PLUGINS:
        assert hasattr(plugins, f"{name}Plugin"), name


# --------------------------------------------------------------------------------------- --plugin-args
def _parse(*extra):
    return get_parser().parse_args(["bids", "out", "participant", *map(str, extra)])


def _usage_error(capsys, *extra) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse(*extra)
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --plugin-args" in err or "argument --plugin" in err
    return err


def test_plugin_args_as_json_text():
    opts = _parse("--plugin", "SLURMGraph", "--plugin-args", '{"sbatch_args": "-p short", "max_tries": 3}')
    assert opts.plugin == "SLURMGraph" and opts.plugin_args == {"sbatch_args": "-p short", "max_tries": 3}
    opts = _parse()
    assert opts.plugin is None and opts.plugin_args is None


def test_plugin_args_from_json_and_yaml_files(tmp_path):
    args = {"sbatch_args": "--time=30 -p short", "dont_resubmit_completed_jobs": True}
    (tmp_path / "args.json").write_text(json.dumps(args))
    assert _parse("--plugin-args", tmp_path / "args.json").plugin_args == args
    for name in ("args.yaml", "args.yml"):
        (tmp_path / name).write_text("sbatch_args: --time=30 -p short\ndont_resubmit_completed_jobs: true\n")
        assert _parse("--plugin-args", tmp_path / name).plugin_args == args


def test_plugin_args_must_be_an_object(tmp_path, capsys):
    err = _usage_error(capsys, "--plugin-args", "[1, 2]")
    assert "--plugin-args: must be a JSON object of plugin arguments" in err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    err = _usage_error(capsys, "--plugin-args", tmp_path / "list.yaml")
    assert f"{tmp_path / 'list.yaml'}: must be a JSON object" in err
    (tmp_path / "number.json").write_text("42\n")
    assert f"{tmp_path / 'number.json'}: must be a JSON object" in _usage_error(capsys, "--plugin-args",
                                                                                 tmp_path / "number.json")


def test_invalid_plugin_args_name_the_problem(tmp_path, capsys):
    err = _usage_error(capsys, "--plugin-args", '{"sbatch_args": }')
    assert "--plugin-args: not a JSON object nor a JSON/YAML file (Expecting value at character 16)" in err
    # a file that does not exist is read as JSON text, and says so
    assert "not a JSON object nor a JSON/YAML file" in _usage_error(capsys, "--plugin-args", tmp_path / "no.json")
    (tmp_path / "bad.json").write_text("{'single': 'quotes'}")
    err = _usage_error(capsys, "--plugin-args", tmp_path / "bad.json")
    assert f"{tmp_path / 'bad.json'}: not a JSON object nor a JSON/YAML file (Expecting property name" in err
    (tmp_path / "bad.yaml").write_text("sbatch_args: [unclosed\n")
    assert f"{tmp_path / 'bad.yaml'}: not valid YAML" in _usage_error(capsys, "--plugin-args", tmp_path / "bad.yaml")


def test_unknown_plugin_is_a_usage_error(capsys):
    err = _usage_error(capsys, "--plugin", "Slurm")
    assert "invalid choice: 'Slurm'" in err and "SLURMGraph" in err


def test_plugin_options_reach_the_run_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bids").mkdir()
    config = build_config(_parse("--no-seg", "--plugin", "SLURMGraph", "--plugin-args", '{"sbatch_args": "-c 2"}'),
                          [])[0]
    assert config.plugin == "SLURMGraph" and config.plugin_args == {"sbatch_args": "-c 2"}
    assert "SLURMGraph" in config.to_toml() and "sbatch_args" in config.to_toml()
    config = build_config(_parse("--no-seg", "--nprocs", "2"), [])[0]
    assert config.plugin is None and config.plugin_args == {}


# ------------------------------------------------------------------------------ following SLURMGraph jobs
def _fake_tools(tmp_path: Path, monkeypatch, outputs: list[str]) -> Path:
    """``squeue`` that prints ``outputs`` one call after the other (the last one from then on) and
    ``scancel`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for i, text in enumerate(outputs):
        (tmp_path / f"squeue-{i}.txt").write_text(text)
    (bin_dir / "squeue").write_text(f"""#!/bin/sh
n=$(cat {tmp_path}/calls 2>/dev/null || echo 0)
echo $((n + 1)) > {tmp_path}/calls
[ "$n" -ge {len(outputs) - 1} ] && n={len(outputs) - 1}
echo "$@" >> {tmp_path}/squeue-args
cat {tmp_path}/squeue-$n.txt
""")
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scancelled\n')
    for tool in ("squeue", "scancel"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_wait_slurm_follows_the_jobs_of_this_run(tmp_path, monkeypatch):
    a, b, c = (str(tmp_path / f"batch/batchscript_{x}.sh") for x in "abc")
    other = "/elsewhere/batchscript_x.sh"
    fake = _fake_tools(tmp_path, monkeypatch, [
        f"11|RUNNING|None|{a}\n12|PENDING|Dependency|{b}\n13|PENDING|Dependency|{c}\n99|RUNNING|None|{other}\n",
        f"11|COMPLETED|None|{a}\n12|FAILED|NonZeroExitCode|{b}\n13|PENDING|DependencyNeverSatisfied|{c}\n"
        f"99|RUNNING|None|{other}\n",
        f"11|COMPLETED|None|{a}\n12|FAILED|NonZeroExitCode|{b}\n13|CANCELLED|None|{c}\n99|RUNNING|None|{other}\n",
    ])
    ended = participant._wait_slurm({a, b, c}, 3, poll=0.01)
    # the job of another run (99) never kept it waiting; the job left waiting on a failed one is cancelled
    assert (fake / "scancelled").read_text().split() == ["13"]
    assert ended == {a: ("11", "COMPLETED"), b: ("12", "FAILED")}  # 13 was cancelled here: not a cause
    assert int((fake / "calls").read_text()) == 3
    args = (fake / "squeue-args").read_text().split()
    assert "--states=all" in args and f"--user={os.getuid()}" in args  # a uid: no passwd entry needed


def test_wait_slurm_stops_when_nothing_was_submitted(tmp_path, monkeypatch, caplog):
    _fake_tools(tmp_path, monkeypatch, ["99|RUNNING|None|/elsewhere/batchscript_x.sh\n"])
    assert participant._wait_slurm({str(tmp_path / "batchscript_a.sh")}, 1, poll=0.01) == {}
    assert "none of the 1 SLURM jobs of this run is in the queue" in caplog.text


def test_crashed_nodes_come_from_new_crash_files(tmp_path):
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "crash-1-root-n4-x.txt").write_text("Node: arborseg_wf.sub_01_wf.anat_preproc_wf.n4_wf.n4\n...")
    old = crash / "crash-0-root-denoise-y.txt"
    old.write_text("Node: arborseg_wf.sub_01_wf.anat_preproc_wf.denoise_wf.denoise\n")
    os.utime(old, (1, 1))  # from an earlier run
    since = (crash / "crash-1-root-n4-x.txt").stat().st_mtime
    assert participant._crashed_nodes(crash, since) == {"arborseg_wf.sub_01_wf.anat_preproc_wf.n4_wf.n4"}
    assert participant._crashed_nodes(tmp_path / "none", since) == set()


class _FakeNode:
    """What ``_follow_graph_jobs`` reads from a node of nipype's execution graph."""

    def __init__(self, root: Path, hierarchy: str, name: str, duration: float | None):
        self._hierarchy, self._id, self.name = hierarchy, name, name
        self.fullname = f"{hierarchy}.{name}"
        self._dir = root / hierarchy.replace(".", "/") / name
        if duration is not None:  # a result file written by the job
            self._dir.mkdir(parents=True)
            (self._dir / f"result_{name}.pklz").write_bytes(b"")
        self.duration = duration

    def output_dir(self):
        return str(self._dir)

    @property
    def result(self):
        from types import SimpleNamespace

        return SimpleNamespace(runtime=SimpleNamespace(duration=self.duration))


def test_follow_graph_jobs_marks_failed_steps_and_times_the_others(tmp_path, monkeypatch):
    import time

    import networkx as nx

    from bids_app.bids import AnatInputs
    from bids_app.cli.participant import SubjectRun, _follow_graph_jobs

    started = time.time()
    work, out = tmp_path / "work", tmp_path / "out"
    sub = "arborseg_wf.sub_01_wf.anat_preproc_wf"
    denoise = _FakeNode(work, f"{sub}.denoise_wf", "denoise", 2.5)
    n4 = _FakeNode(work, f"{sub}.n4_wf", "n4", 4.0)  # crashed: a crash file below
    register = _FakeNode(work, f"{sub}.template_registration_wf", "register", None)  # never ran
    other = _FakeNode(work, "arborseg_wf.sub_02_wf.anat_preproc_wf.n4_wf", "n4", None)  # killed: time limit
    graph = nx.DiGraph([(denoise, n4), (n4, register)])
    graph.add_node(other)
    batch = work / "arborseg_wf" / "batch"
    batch.mkdir(parents=True)
    scripts = {}
    for node in (denoise, n4, register, other):
        scripts[node] = batch / f"batchscript_pyscript_20260101_000000_{node._hierarchy}_{node._id}.sh"
        scripts[node].write_text("#!/bin/bash\n")
    crash = out / "logs" / "crash"
    crash.mkdir(parents=True)
    (crash / "crash-x-root-n4-1.txt").write_text(f"Node: {n4.fullname}\nWorking directory: ...\n")
    _fake_tools(tmp_path, monkeypatch, [
        f"1|COMPLETED|None|{scripts[denoise]}\n2|FAILED|NonZeroExitCode|{scripts[n4]}\n"
        f"3|PENDING|DependencyNeverSatisfied|{scripts[register]}\n4|TIMEOUT|TimeLimit|{scripts[other]}\n",
        f"1|COMPLETED|None|{scripts[denoise]}\n2|FAILED|NonZeroExitCode|{scripts[n4]}\n"
        f"3|CANCELLED|None|{scripts[register]}\n4|TIMEOUT|TimeLimit|{scripts[other]}\n",
    ])
    monkeypatch.setattr(participant, "_wait_slurm",
                        lambda s, total, poll=2.0, _wait=participant._wait_slurm: _wait(s, total, poll=0.01))
    runs = {f"sub_{s}_wf": SubjectRun(inputs=AnatInputs(subject=s, session=None, t1w=None)) for s in ("01", "02")}
    config = RunConfig(bids_dir=tmp_path, output_dir=out, analysis_level="participant", work_dir=work,
                       plugin="SLURMGraph")
    notes = _follow_graph_jobs(config, graph, runs, started)
    assert runs["sub_01_wf"].failed_nodes == [n4.fullname]  # not the step cancelled after it
    assert runs["sub_02_wf"].failed_nodes == [other.fullname]
    # the crash file explains n4 (participant._crash_message); the killed job only has its SLURM state
    assert notes == {n4.fullname: "anat_preproc_wf.n4_wf.n4: SLURM job 2 ended FAILED",
                     other.fullname: "anat_preproc_wf.n4_wf.n4: SLURM job 4 ended TIMEOUT"}
    # per-stage times from the result files written by this run's jobs
    assert runs["sub_01_wf"].stage_seconds == {"denoise": 2.5, "n4": 4.0}
    assert runs["sub_02_wf"].stage_seconds == {}
    assert (tmp_path / "scancelled").read_text().split() == ["3"]
